//! `herd bench BUNDLE --serve`: a bounded load run through real servers on 127.0.0.1, the same greedy
//! requests once one by one (a one-slot server) and once `concurrency` at a time (a server of that many
//! slots), with requests/s, tokens/s and latency percentiles of each.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use herd_runtime::{Model, RuntimeOptions};
use serde_json::{json, Value};

/// How the load run is shaped.
pub struct LoadShape {
    pub requests: usize,
    pub concurrency: usize,
    pub max_tokens: usize,
}

/// Runs the load and returns the report.
pub fn run(bundle: &std::path::Path, options: &RuntimeOptions, shape: &LoadShape) -> Result<Value> {
    let model = Arc::new(Model::load(bundle, options)?);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    // One server per shape: one by one on a single slot (no idle rows), concurrent on `concurrency`.
    let serve = |slots: usize| -> Result<String> {
        let config = super::ServerConfig {
            micro_batches: None,
            max_batch: slots,
            max_queue: shape.requests,
            max_body: 1 << 20,
            body_timeout: Duration::from_secs(30),
            api_key: None,
            name: "bench".into(),
            guard: None,
            runtime: options.clone(),
        };
        let (router, _app) = super::router(model.clone(), &config)?;
        let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
        let url = format!("http://{}/v1/completions", listener.local_addr()?);
        runtime.spawn(async move { axum::serve(listener, router).await });
        Ok(url)
    };
    let prompts: Vec<String> = (0..shape.requests)
        .map(|i| format!("Request {i}: tell me about the number {}", i * 7))
        .collect();
    let one_by_one = timed(&serve(1)?, &prompts, 1, shape.max_tokens)?;
    let concurrent = timed(
        &serve(shape.concurrency.max(1))?,
        &prompts,
        shape.concurrency,
        shape.max_tokens,
    )?;
    let speedup = concurrent["tokens_per_s"].as_f64().unwrap_or(0.0)
        / one_by_one["tokens_per_s"].as_f64().unwrap_or(1.0).max(1e-9);
    Ok(json!({
        "bundle": bundle,
        "requests": shape.requests,
        "concurrency": shape.concurrency,
        "max_tokens": shape.max_tokens,
        "one_by_one": one_by_one,
        "concurrent": concurrent,
        "tokens_per_s_speedup": speedup,
    }))
}

/// Sends every prompt, `at_once` requests in flight at a time.
fn timed(url: &str, prompts: &[String], at_once: usize, max_tokens: usize) -> Result<Value> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let start = Instant::now();
    let results: Vec<Result<Vec<(Duration, u64)>>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..at_once.max(1))
            .map(|_| {
                s.spawn(|| {
                    let mut done = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(prompt) = prompts.get(i) else {
                            return Ok(done);
                        };
                        let began = Instant::now();
                        let body = json!({"prompt": prompt, "max_tokens": max_tokens,
                            "temperature": 0, "ignore_eos": true});
                        let answer: Value = ureq::post(url)
                            .send_json(body)
                            .context("a load request failed")?
                            .into_json()?;
                        let tokens = answer["usage"]["completion_tokens"].as_u64().unwrap_or(0);
                        done.push((began.elapsed(), tokens));
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| {
                w.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a load worker panicked")))
            })
            .collect()
    });
    let wall = start.elapsed().as_secs_f64();
    let mut all = Vec::new();
    for r in results {
        all.extend(r?);
    }
    let mut latencies: Vec<f64> = all.iter().map(|(d, _)| d.as_secs_f64() * 1e3).collect();
    latencies.sort_by(f64::total_cmp);
    let percentile = |p: f64| {
        latencies
            .get(((latencies.len() as f64 - 1.0) * p).round() as usize)
            .copied()
            .unwrap_or(0.0)
    };
    let tokens: u64 = all.iter().map(|(_, t)| t).sum();
    Ok(json!({
        "seconds": wall,
        "requests_per_s": all.len() as f64 / wall,
        "tokens_per_s": tokens as f64 / wall,
        "latency_p50_ms": percentile(0.5),
        "latency_p99_ms": percentile(0.99),
    }))
}
