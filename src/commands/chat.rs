//! `herd chat BUNDLE`: an interactive conversation, streamed token by token. Each line read is a user
//! turn; `/reset` forgets the conversation, `/exit` (or end of input) quits.

use std::io::{BufRead, Write};
use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use herd_runtime::{Message, Model, Prompt};

use super::run::SamplingArgs;

/// Arguments of `herd chat`.
#[derive(Args)]
pub struct ChatArgs {
    /// A bundle folder with a tokenizer (compiled from a checkpoint that has tokenizer.json).
    pub bundle: PathBuf,
    /// A system message to start every conversation with.
    #[arg(long)]
    pub system: Option<String>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub runtime: super::runtime_args::RuntimeArgs,
}

/// Runs the command.
pub fn run(args: &ChatArgs) -> Result<()> {
    let model = Model::load(&args.bundle, &args.runtime.options())?;
    anyhow::ensure!(
        model.text().is_some(),
        "{} has no tokenizer.json: chat needs text",
        args.bundle.display()
    );
    let fresh = || {
        args.system
            .iter()
            .map(|s| Message {
                role: "system".into(),
                content: s.clone(),
            })
            .collect::<Vec<_>>()
    };
    let mut messages = fresh();
    let params = args.sampling.params(false);
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    loop {
        write!(out, "> ")?;
        out.flush()?;
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            break;
        }
        let line = line.trim();
        match line {
            "" => continue,
            "/exit" => break,
            "/reset" => {
                messages = fresh();
                continue;
            }
            _ => {}
        }
        messages.push(Message {
            role: "user".into(),
            content: line.to_string(),
        });
        let mut reply = String::new();
        for event in model.stream(Prompt::Chat(messages.clone()), &params, None)? {
            let event = event?;
            write!(out, "{}", event.text)?;
            out.flush()?;
            reply.push_str(&event.text);
        }
        writeln!(out)?;
        messages.push(Message {
            role: "assistant".into(),
            content: reply,
        });
    }
    Ok(())
}
