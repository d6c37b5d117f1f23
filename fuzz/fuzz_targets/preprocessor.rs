//! Fuzz target `preprocessor`: see `herd::fuzzing::preprocessor`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| herd::fuzzing::preprocessor(data));
