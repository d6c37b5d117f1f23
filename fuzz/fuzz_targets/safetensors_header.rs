//! Fuzz target `safetensors_header`: see `herd::fuzzing::safetensors_header`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| herd::fuzzing::safetensors_header(data));
