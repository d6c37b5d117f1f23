//! `herd verify BUNDLE`: every file the manifest lists, its size and sha256, hashed in parallel and
//! streamed; names each damaged file and fails if there is any.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

/// Arguments of `herd verify`.
#[derive(Args)]
pub struct VerifyArgs {
    /// A bundle folder.
    pub bundle: PathBuf,
    /// Print one JSON object (`files`: path, bytes, ok, problem) instead of a line per file.
    #[arg(long)]
    pub json: bool,
}

/// Runs the command.
pub fn run(args: &VerifyArgs) -> Result<()> {
    let bundle = herd_runtime::Bundle::open(&args.bundle)?;
    let checks = bundle.verify();
    let damaged = checks.iter().filter(|c| c.problem.is_some()).count();
    if args.json {
        let files: Vec<serde_json::Value> = checks
            .iter()
            .map(|c| {
                serde_json::json!({
                    "path": c.path,
                    "bytes": c.bytes,
                    "ok": c.problem.is_none(),
                    "problem": c.problem,
                })
            })
            .collect();
        outln!(
            "{}",
            serde_json::json!({ "files": files, "damaged": damaged })
        );
    } else {
        for c in &checks {
            match &c.problem {
                None => outln!("ok       {:>14} B  {}", c.bytes, c.path),
                Some(p) => outln!("DAMAGED  {:>14} B  {}: {p}", c.bytes, c.path),
            }
        }
    }
    anyhow::ensure!(
        damaged == 0,
        "{}: {damaged} of {} file(s) damaged; recompile or copy the bundle again",
        args.bundle.display(),
        checks.len()
    );
    if !args.json {
        eprintln!(
            "{}: all {} files match the manifest",
            args.bundle.display(),
            checks.len()
        );
    }
    Ok(())
}
