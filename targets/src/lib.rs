//! herd-targets: the back ends that turn a Lowered graph into deployable files, and the bundle writer.

pub mod bundle;
pub mod error;
pub mod onnx;
pub mod tensorrt;

pub use error::TargetError;

/// Lowercase hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    herd_runtime::bundle::digest_hex(&sha2::Sha256::digest(bytes))
}
