//! One module per `herd` subcommand.

pub mod bench;
pub mod build_engine;
pub mod chat;
pub mod compile;
pub mod eval;
pub mod inspect;
pub mod lint;
pub mod plan;
pub mod run;
pub mod runtime_args;
pub mod synth;
pub mod verify;
