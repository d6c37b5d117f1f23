//! Replays the committed fuzz corpus (`fuzz/corpus/TARGET/`) and every input a fuzzing run found a
//! problem with (`fuzz/regressions/TARGET/`) through the fuzz targets' bodies, on the stable toolchain:
//! none may panic. The fuzzers themselves run with `cargo fuzz` (README "Trust and safety").

use std::path::PathBuf;

fn inputs(kind: &str, target: &str) -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz")
        .join(kind)
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    files.sort();
    files
}

#[test]
fn corpus_and_regressions_replay_without_panics() {
    for (target, body) in herd::fuzzing::TARGETS {
        let corpus = inputs("corpus", target);
        assert!(
            corpus.len() >= 2,
            "fuzz/corpus/{target} holds {} inputs",
            corpus.len()
        );
        for path in corpus.iter().chain(&inputs("regressions", target)) {
            let data = std::fs::read(path).unwrap();
            let outcome = std::panic::catch_unwind(|| body(&data));
            assert!(outcome.is_ok(), "{target}: {} panicked", path.display());
        }
    }
}
