//! Summaries of ONNX Runtime's profiles (`herd bench --profile`): kernel time per operator type.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Deserialize;

/// One event of ONNX Runtime's Chrome-trace profile.
#[derive(Deserialize)]
struct Event {
    #[serde(default)]
    cat: String,
    #[serde(default)]
    name: String,
    /// Microseconds.
    #[serde(default)]
    dur: u64,
    #[serde(default)]
    args: EventArgs,
}

#[derive(Default, Deserialize)]
struct EventArgs {
    #[serde(default)]
    op_name: String,
}

/// Kernel time of one operator type over a profile.
#[derive(Debug, PartialEq)]
pub struct OpTime {
    pub op: String,
    pub milliseconds: f64,
    pub calls: u64,
}

/// Largest profile read (ONNX Runtime writes about 300 bytes per kernel run).
const MAX_PROFILE_BYTES: u64 = 4 << 30;

/// The profiles ONNX Runtime wrote for `prefix` (`PREFIX_<date>.json`) that are not in `before`.
pub fn written_since(prefix: &Path, before: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let folder = match prefix.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let stem = prefix
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let Ok(entries) = std::fs::read_dir(&folder) else {
        return Ok(Vec::new());
    };
    let mut found: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.file_name().is_some_and(|n| {
                let n = n.to_string_lossy();
                n.starts_with(&format!("{stem}_")) && n.ends_with(".json")
            }) && !before.contains(p)
        })
        .collect();
    found.sort();
    Ok(found)
}

/// Kernel time per operator type over `files`, largest first.
pub fn kernel_time_by_op(files: &[PathBuf]) -> Result<Vec<OpTime>> {
    let mut totals: HashMap<String, (u64, u64)> = HashMap::new();
    for file in files {
        let size = std::fs::metadata(file)
            .with_context(|| format!("reading profile {}", file.display()))?
            .len();
        anyhow::ensure!(
            size <= MAX_PROFILE_BYTES,
            "profile {} is {size} bytes, more than herd reads ({MAX_PROFILE_BYTES}): profile fewer steps (--decode-steps)",
            file.display()
        );
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("reading profile {}", file.display()))?;
        let events: Vec<Event> = serde_json::from_str(&text).with_context(|| {
            format!(
                "profile {} is not ONNX Runtime's trace format",
                file.display()
            )
        })?;
        for e in events {
            if e.cat == "Node" && e.name.ends_with("_kernel_time") && !e.args.op_name.is_empty() {
                let entry = totals.entry(e.args.op_name).or_default();
                entry.0 += e.dur;
                entry.1 += 1;
            }
        }
    }
    let mut ops: Vec<OpTime> = totals
        .into_iter()
        .map(|(op, (micros, calls))| OpTime {
            op,
            milliseconds: micros as f64 / 1e3,
            calls,
        })
        .collect();
    ops.sort_by(|a, b| {
        b.milliseconds
            .total_cmp(&a.milliseconds)
            .then(a.op.cmp(&b.op))
    });
    Ok(ops)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_events_are_summed_per_operator_type() {
        let dir = tempfile::tempdir().unwrap();
        let prefix = dir.path().join("p");
        let old = dir.path().join("p_old.json");
        std::fs::write(&old, "[]").unwrap();
        let file = dir.path().join("p_2026.json");
        std::fs::write(
            &file,
            r#"[{"cat":"Session","name":"model_run","dur":900},
                {"cat":"Node","name":"a_fence_before","dur":5,"args":{"op_name":"MatMul"}},
                {"cat":"Node","name":"a_kernel_time","dur":1500,"args":{"op_name":"MatMul"}},
                {"cat":"Node","name":"b_kernel_time","dur":500,"args":{"op_name":"MatMul"}},
                {"cat":"Node","name":"c_kernel_time","dur":3000,"args":{"op_name":"QMoE"}}]"#,
        )
        .unwrap();
        let files = written_since(&prefix, &[old]).unwrap();
        assert_eq!(files, vec![file]);
        let ops = kernel_time_by_op(&files).unwrap();
        assert_eq!(
            ops,
            vec![
                OpTime {
                    op: "QMoE".into(),
                    milliseconds: 3.0,
                    calls: 1
                },
                OpTime {
                    op: "MatMul".into(),
                    milliseconds: 2.0,
                    calls: 2
                },
            ]
        );
    }
}
