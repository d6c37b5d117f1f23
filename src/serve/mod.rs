//! `herd serve BUNDLE`: an OpenAI-compatible HTTP server on the runtime's continuous-batching scheduler
//! (one engine thread runs the batch; requests join it between steps). Loopback by default; SIGTERM or
//! SIGINT stops accepting connections and drains the requests in flight.

mod engine;
mod guard;
pub mod load;
mod metrics;
mod openai;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use clap::Args;
use herd_runtime::Model;

/// Arguments of `herd serve`.
#[derive(Args)]
pub struct ServeArgs {
    /// The bundle to serve (it needs its tokenizer.json).
    pub bundle: PathBuf,
    /// Address to listen on (loopback by default: put a proxy in front to expose it).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: std::net::IpAddr,
    /// Port to listen on (0 picks a free one; the address is printed).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` on /v1/* (or set HERD_API_KEY).
    #[arg(long, env = "HERD_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Sequences decoded together (KV cache slots, allocated at startup).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub max_batch: u16,
    /// Micro-batches the slots are split into, run through a staged bundle's pipeline stages together
    /// so the stages' devices overlap (default: as many as the bundle has stages when that divides
    /// --max-batch, else 1).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub micro_batches: Option<u16>,
    /// Requests waiting for a slot before new ones get 429.
    #[arg(long, default_value_t = 64)]
    pub max_queue: usize,
    /// Largest request body in bytes (413 above; images arrive base64 in the body).
    #[arg(long, default_value_t = 16 << 20)]
    pub max_body: usize,
    /// Seconds a client has to send its whole request body (408 after).
    #[arg(long, default_value_t = 30.0)]
    pub body_timeout: f64,
    /// The model id clients send (default: the bundle folder's name).
    #[arg(long)]
    pub model_name: Option<String>,
    /// A Llama Guard 4 bundle that classifies each conversation before generation and the answer
    /// after; an unsafe verdict ends the response with finish_reason `content_filter`.
    #[arg(long, value_name = "GUARD_BUNDLE")]
    pub guard: Option<PathBuf>,
    #[command(flatten)]
    pub runtime: crate::commands::runtime_args::RuntimeArgs,
}

/// What a server needs besides its listener.
pub struct ServerConfig {
    pub max_batch: usize,
    /// Micro-batches of the slots (None: automatic, see [`ServeArgs::micro_batches`]).
    pub micro_batches: Option<usize>,
    pub max_queue: usize,
    pub max_body: usize,
    pub body_timeout: std::time::Duration,
    pub api_key: Option<String>,
    pub name: String,
    pub guard: Option<PathBuf>,
    pub runtime: herd_runtime::RuntimeOptions,
}

/// The router over `model`, with its engine thread started.
pub fn router(model: Arc<Model>, config: &ServerConfig) -> Result<(Router, Arc<openai::App>)> {
    if model.text().is_none() {
        anyhow::bail!(
            "{}: herd serve needs the bundle's tokenizer.json (compile from a checkpoint that has one)",
            model.bundle.dir.display()
        );
    }
    let metrics = Arc::new(metrics::Metrics::default());
    let stages = model.stage_count();
    let micro_batches = config
        .micro_batches
        .unwrap_or(if config.max_batch % stages == 0 {
            stages
        } else {
            1
        });
    let engine = engine::Engine::start(
        model.clone(),
        config.max_batch,
        micro_batches,
        config.max_queue,
        metrics.clone(),
    )?;
    let app = Arc::new(openai::App {
        model,
        engine,
        metrics,
        api_key: config.api_key.clone().filter(|k| !k.is_empty()),
        name: config.name.clone(),
        guard: match &config.guard {
            Some(dir) => Some(guard::Guard::load(dir, &config.runtime)?),
            None => None,
        },
    });
    let v1 = Router::new()
        .route("/v1/models", get(openai::models))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/chat/completions", post(openai::chat))
        .layer(axum::middleware::from_fn_with_state(
            app.clone(),
            openai::authorize,
        ));
    let router = Router::new()
        .merge(v1)
        .route("/health", get(openai::health))
        .route("/metrics", get(openai::metrics))
        .layer(DefaultBodyLimit::max(config.max_body))
        .layer(axum::middleware::from_fn_with_state(
            openai::BodyLimits {
                max: config.max_body,
                timeout: config.body_timeout,
            },
            openai::limit_body,
        ))
        .with_state(app.clone());
    Ok((router, app))
}

/// Runs the server until SIGTERM or SIGINT, then drains.
pub fn run(args: &ServeArgs) -> Result<()> {
    let model = Model::load(&args.bundle, &args.runtime.options())
        .with_context(|| format!("loading {}", args.bundle.display()))?;
    let config = ServerConfig {
        max_batch: args.max_batch.into(),
        micro_batches: args.micro_batches.map(usize::from),
        max_queue: args.max_queue,
        max_body: args.max_body,
        body_timeout: std::time::Duration::try_from_secs_f64(args.body_timeout)
            .ok()
            .filter(|d| !d.is_zero())
            .context("--body-timeout must be a positive number of seconds")?,
        api_key: args.api_key.clone(),
        guard: args.guard.clone(),
        runtime: args.runtime.options(),
        name: args.model_name.clone().unwrap_or_else(|| {
            args.bundle
                .file_name()
                .map_or("herd".into(), |n| n.to_string_lossy().into_owned())
        }),
    };
    let (router, app) = router(Arc::new(model), &config)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let address = SocketAddr::new(args.host, args.port);
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .with_context(|| format!("listening on {address}"))?;
        let local = listener.local_addr()?;
        outln!("herd serve: {} on http://{local}/v1", app.name);
        axum::serve(listener, router)
            .with_graceful_shutdown(shutdown())
            .await
            .context("serving")?;
        eprintln!("herd serve: drained, exiting");
        Ok(())
    })
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    eprintln!("herd serve: stopping: no new connections, draining requests in flight");
}
