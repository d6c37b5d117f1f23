//! The `herd` command line: compile Llama 4 checkpoints into deployable bundles and inspect them.

/// `println!` that returns an error instead of panicking when standard output cannot be written
/// (a full disk, `> /dev/full`); a closed pipe still ends the process quietly (SIGPIPE).
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*).map_err(crate::stdout_error)?;
    }};
}

/// `print!` with [`outln!`]'s error handling; flushes, since callers stream text.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let mut stdout = std::io::stdout().lock();
        write!(stdout, $($arg)*)
            .and_then(|()| stdout.flush())
            .map_err(crate::stdout_error)?;
    }};
}

/// The error of a failed write to standard output.
fn stdout_error(e: std::io::Error) -> anyhow::Error {
    anyhow::anyhow!("cannot write to standard output: {e}")
}

mod bench;
mod commands;
mod driver;
mod engine;
mod eval;
mod plan;
mod profile;
mod serve;
mod synth;
use herd::vision_manifest;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// herd: a deployment compiler for the Llama 4 family (Scout, Maverick).
///
/// It reads a Hugging Face checkpoint into a graph IR, runs lowering, fusion and quantization passes,
/// and emits ONNX / TensorRT bundles with a small runtime that executes them.
#[derive(Parser)]
#[command(name = "herd", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Summarise a checkpoint folder: its config, parameter counts, and optionally the imported IR.
    Inspect(commands::inspect::InspectArgs),
    /// Compile a checkpoint into a bundle (ONNX model + external weights + manifest).
    Compile(commands::compile::CompileArgs),
    /// Generate tokens from a compiled bundle with ONNX Runtime.
    Run(commands::run::RunArgs),
    /// Chat with a compiled bundle interactively (streamed; needs the checkpoint's tokenizer).
    Chat(commands::chat::ChatArgs),
    /// Write a synthetic Llama 4-shaped checkpoint (random bf16 weights) for benchmarks.
    Synth(commands::synth::SynthArgs),
    /// Measure a bundle (load, prefill, decode, memory, roofline) or, with --compile, compiling a checkpoint.
    Bench(commands::bench::BenchArgs),
    /// Compare a bundle's next-token distributions with a reference (KL divergence, top-1 agreement).
    Eval(commands::eval::EvalArgs),
    /// Check a bundle's graph against TensorRT's ONNX parser (also run by compile --target tensorrt-h100).
    Lint(commands::lint::LintArgs),
    /// Plan a deployment from config.json or a bundle: weight, KV and activation bytes, GPUs needed,
    /// the longest context that fits, decode and prefill rooflines.
    Plan(commands::plan::PlanArgs),
    /// Check every file of a bundle against its manifest (size and sha256); names each damaged file.
    Verify(commands::verify::VerifyArgs),
    /// Build a tensorrt-target bundle's TensorRT engine on this machine's GPU (H100).
    BuildEngine(commands::build_engine::BuildEngineArgs),
    /// Serve a bundle over OpenAI's HTTP API (completions, chat, streaming) with continuous batching.
    Serve(serve::ServeArgs),
}

/// Streaming allocates and frees blocks of tens of MiB continuously. By default glibc maps each one
/// fresh and unmaps it on free, so every block costs page faults and kernel page clearing; keeping
/// them on the heap lets the next block reuse the same pages.
fn keep_freed_blocks() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only tunes allocator thresholds; it is called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

/// Rust ignores SIGPIPE, so printing into a closed pipe (`herd ... | head`) would panic; a command-line
/// tool should just stop, as the default disposition does.
fn exit_quietly_on_closed_pipe() {
    #[cfg(unix)]
    // SAFETY: restores the default SIGPIPE disposition before any other thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Set by the interrupt thread before it removes staging folders: from then on that thread owns the
/// exit, so the main thread must not report the write errors the removal causes as its own failure.
static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// On SIGINT or SIGTERM, remove the staging folders of unfinished bundles before exiting (the
/// default disposition would leave hundreds of MB behind), with the shell's 128 + signal status.
fn clean_up_on_interrupt() {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let Ok(mut signals) = signal_hook::iterator::Signals::new([SIGINT, SIGTERM]) else {
        return;
    };
    std::thread::spawn(move || {
        if let Some(signal) = signals.forever().next() {
            INTERRUPTED.store(true, std::sync::atomic::Ordering::SeqCst);
            herd_targets::bundle::remove_staging_folders();
            eprintln!("herd: interrupted; unfinished bundles removed");
            std::process::exit(128 + signal);
        }
    });
}

/// Weights are memory-mapped: a file truncated while herd reads it raises SIGBUS at the next touch of
/// a vanished page. Nothing can be recovered then, but the user gets a reason instead of a bus error.
fn explain_bus_errors() {
    extern "C" fn on_sigbus(_: libc::c_int) {
        const MESSAGE: &[u8] = b"error: a memory-mapped weight file shrank while herd was reading it (truncated or rewritten in place); replace bundles and checkpoints by renaming new files into place, never by writing over them\n";
        // SAFETY: write(2) and _exit(2) are async-signal-safe.
        unsafe {
            libc::write(2, MESSAGE.as_ptr().cast(), MESSAGE.len());
            libc::_exit(135);
        }
    }
    #[cfg(unix)]
    // SAFETY: installs a handler that only calls async-signal-safe functions, before other threads.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigbus as *const () as usize;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut());
    }
}

fn main() -> ExitCode {
    exit_quietly_on_closed_pipe();
    keep_freed_blocks();
    explain_bus_errors();
    // HERD_LOG picks the levels (`info` shows pass timings); without it herd's own warnings show,
    // and ONNX Runtime's log lines do not.
    let filter = std::env::var("HERD_LOG").unwrap_or_else(|_| {
        "herd=warn,herd_runtime=warn,herd_passes=warn,herd_targets=warn,herd_ir=warn".to_string()
    });
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    // The server drains on SIGTERM/SIGINT itself; everything else removes unfinished bundles and exits.
    if !matches!(cli.command, Command::Serve(_)) {
        clean_up_on_interrupt();
    }
    let result = match cli.command {
        Command::Inspect(args) => commands::inspect::run(&args),
        Command::Compile(args) => commands::compile::run(&args),
        Command::Run(args) => commands::run::run(&args),
        Command::Chat(args) => commands::chat::run(&args),
        Command::Synth(args) => commands::synth::run(&args),
        Command::Bench(args) => commands::bench::run(&args),
        Command::Eval(args) => commands::eval::run(&args),
        Command::Lint(args) => commands::lint::run(&args),
        Command::Plan(args) => commands::plan::run(&args),
        Command::Verify(args) => commands::verify::run(&args),
        Command::BuildEngine(args) => commands::build_engine::run(&args),
        Command::Serve(args) => serve::run(&args),
    };
    if INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst) {
        // The interrupt thread is cleaning up and exits with 128 + signal; wait for it.
        loop {
            std::thread::park();
        }
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
