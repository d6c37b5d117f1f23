//! Server metrics in Prometheus' text exposition format: request counts by endpoint and status, tokens,
//! time-to-first-token and latency histograms, queue depth and batch occupancy.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds (seconds) of the histogram buckets.
const BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

#[derive(Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, seconds: f64) {
        for (i, &b) in BUCKETS.iter().enumerate() {
            if seconds <= b {
                self.counts[i] += 1;
            }
        }
        self.count += 1;
        self.sum += seconds;
    }

    fn render(&self, name: &str, help: &str, out: &mut String) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (b, c) in BUCKETS.iter().zip(self.counts) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {c}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}\n{name}_count {}", self.sum, self.count);
    }
}

#[derive(Default)]
struct State {
    requests: BTreeMap<(String, u16), u64>,
    prompt_tokens: u64,
    generated_tokens: u64,
    ttft: Histogram,
    latency: Histogram,
    queued: usize,
    running: usize,
    slots: usize,
    guard_checks: u64,
    guard_refusals: u64,
}

/// Counters shared by the handlers and the engine thread.
#[derive(Default)]
pub struct Metrics {
    state: Mutex<State>,
}

impl Metrics {
    fn with(&self, f: impl FnOnce(&mut State)) {
        if let Ok(mut s) = self.state.lock() {
            f(&mut s);
        }
    }

    /// A finished request of `endpoint` answered with `status`, after `elapsed`.
    pub fn request(&self, endpoint: &str, status: u16, elapsed: Duration) {
        self.with(|s| {
            *s.requests
                .entry((endpoint.to_string(), status))
                .or_default() += 1;
            s.latency.observe(elapsed.as_secs_f64());
        });
    }

    pub fn prompt_tokens(&self, n: usize) {
        self.with(|s| s.prompt_tokens += n as u64);
    }

    pub fn generated_tokens(&self, n: usize) {
        self.with(|s| s.generated_tokens += n as u64);
    }

    /// One guard verdict (`unsafe` when it refused).
    pub fn guard_check(&self, unsafe_verdict: bool) {
        self.with(|s| {
            s.guard_checks += 1;
            s.guard_refusals += u64::from(unsafe_verdict);
        });
    }

    pub fn time_to_first_token(&self, elapsed: Duration) {
        self.with(|s| s.ttft.observe(elapsed.as_secs_f64()));
    }

    /// Jobs waiting for a slot, sequences running, slots in all.
    pub fn set_load(&self, queued: usize, running: usize, slots: usize) {
        self.with(|s| {
            s.queued = queued;
            s.running = running;
            s.slots = slots;
        });
    }

    /// The exposition text.
    pub fn render(&self) -> String {
        let mut out = String::new();
        self.with(|s| {
            out.push_str("# HELP herd_requests_total Requests answered, by endpoint and HTTP status.\n# TYPE herd_requests_total counter\n");
            for ((endpoint, status), n) in &s.requests {
                let _ = writeln!(
                    out,
                    "herd_requests_total{{endpoint=\"{endpoint}\",status=\"{status}\"}} {n}"
                );
            }
            let _ = writeln!(out, "# HELP herd_prompt_tokens_total Prompt tokens read.\n# TYPE herd_prompt_tokens_total counter\nherd_prompt_tokens_total {}", s.prompt_tokens);
            let _ = writeln!(out, "# HELP herd_generated_tokens_total Tokens generated.\n# TYPE herd_generated_tokens_total counter\nherd_generated_tokens_total {}", s.generated_tokens);
            s.ttft.render(
                "herd_time_to_first_token_seconds",
                "From a request's arrival at the engine to its first token.",
                &mut out,
            );
            s.latency.render(
                "herd_request_seconds",
                "From a request's arrival to its last byte.",
                &mut out,
            );
            let _ = writeln!(out, "# HELP herd_queue_depth Requests waiting for a batch slot.\n# TYPE herd_queue_depth gauge\nherd_queue_depth {}", s.queued);
            let _ = writeln!(out, "# HELP herd_batch_running Sequences in the running batch.\n# TYPE herd_batch_running gauge\nherd_batch_running {}", s.running);
            let _ = writeln!(out, "# HELP herd_guard_checks_total Guard verdicts, and how many refused.\n# TYPE herd_guard_checks_total counter\nherd_guard_checks_total {}\nherd_guard_refusals_total {}", s.guard_checks, s.guard_refusals);
            let occupancy = s.running as f64 / s.slots.max(1) as f64;
            let _ = writeln!(out, "# HELP herd_batch_occupancy Fraction of batch slots in use.\n# TYPE herd_batch_occupancy gauge\nherd_batch_occupancy {occupancy}");
        });
        out
    }
}
