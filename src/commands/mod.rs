//! One module per `herd` subcommand.

pub mod inspect;
