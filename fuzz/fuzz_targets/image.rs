//! Fuzz target `image`: see `herd::fuzzing::image`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| herd::fuzzing::image(data));
