//! Fuzz target `index`: see `herd::fuzzing::index`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| herd::fuzzing::index(data));
