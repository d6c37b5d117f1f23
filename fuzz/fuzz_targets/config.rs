//! Fuzz target `config`: see `herd::fuzzing::config`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| herd::fuzzing::config(data));
