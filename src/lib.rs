//! The parts of the `herd` compiler other crates (the fuzz targets) reach: reading a checkpoint's
//! image-processor settings into the manifest, and the fuzz targets' bodies. Everything else lives in
//! the binary.

pub mod fuzzing;
pub mod vision_manifest;
