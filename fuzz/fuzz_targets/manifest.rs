//! Fuzz target `manifest`: see `herd::fuzzing::manifest`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| herd::fuzzing::manifest(data));
