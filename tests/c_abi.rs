//! The C ABI from C: tests/c/generate.c, compiled with the system C compiler against runtime/include/herd.h
//! and libherd_runtime.so, loads a tiny bundle, generates from ids and from text, and reads errors.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::{fixture, ok};

#[test]
fn c_program_loads_a_bundle_and_generates() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let target = PathBuf::from(env!("CARGO_BIN_EXE_herd"))
        .parent()
        .unwrap()
        .to_path_buf();
    // The cdylib: built with the workspace, rebuilt here if this test runs alone.
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "-p", "herd-runtime", "--lib"])
        .current_dir(&root)
        .status()
        .expect("cargo");
    assert!(status.success());
    assert!(
        target.join("libherd_runtime.so").is_file(),
        "no libherd_runtime.so in {}",
        target.display()
    );

    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("bundle");
    ok(&[
        "compile",
        fixture("tiny-scout").to_str().unwrap(),
        "-o",
        bundle.to_str().unwrap(),
        "--max-context",
        "128",
    ]);
    // The same model in two pipeline stages: the C API takes it unchanged.
    let staged = dir.path().join("staged");
    ok(&[
        "compile",
        fixture("tiny-scout").to_str().unwrap(),
        "-o",
        staged.to_str().unwrap(),
        "--max-context",
        "128",
        "--stages",
        "2",
    ]);
    let exe = dir.path().join("generate");
    let compiled = Command::new("cc")
        .arg(root.join("tests/c/generate.c"))
        .arg("-I")
        .arg(root.join("runtime/include"))
        .arg("-L")
        .arg(&target)
        .args(["-lherd_runtime", "-Wall", "-Werror", "-o"])
        .arg(&exe)
        .output()
        .expect("the system C compiler (cc)");
    assert!(
        compiled.status.success(),
        "cc failed:\n{}",
        String::from_utf8_lossy(&compiled.stderr)
    );
    let outputs: Vec<String> = [&bundle, &staged]
        .iter()
        .map(|b| {
            let run = Command::new(&exe)
                .arg(b)
                .arg(common::image("small.png"))
                .env("LD_LIBRARY_PATH", &target)
                .output()
                .unwrap();
            let stdout = String::from_utf8_lossy(&run.stdout).into_owned();
            assert!(
                run.status.success(),
                "exit {:?}\n{stdout}\n{}",
                run.status.code(),
                String::from_utf8_lossy(&run.stderr)
            );
            assert_eq!(
                stdout.lines().filter(|l| l.starts_with("token ")).count(),
                8,
                "{stdout}"
            );
            assert!(stdout.ends_with("ok\n"), "{stdout}");
            stdout
        })
        .collect();
    assert_eq!(outputs[0], outputs[1], "the staged bundle's tokens");
}
