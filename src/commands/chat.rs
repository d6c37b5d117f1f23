//! `herd chat BUNDLE`: an interactive conversation, streamed token by token. Each line read is a user
//! turn; `/image PATH` attaches an image to the next turn, `/reset` forgets the conversation, `/exit`
//! (or end of input) quits.

use std::io::{BufRead, Write};
use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use herd_runtime::vision::ImageSource;
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
    // Every image of the conversation in order (each turn re-renders it), and those for the next turn.
    let mut images: Vec<ImageSource> = Vec::new();
    let mut attached: Vec<ImageSource> = Vec::new();
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
                images.clear();
                attached.clear();
                continue;
            }
            _ => {}
        }
        if let Some(path) = line.strip_prefix("/image ") {
            if model.bundle.manifest.vision.is_none() {
                eprintln!("error: this bundle takes no images (compiled without a vision encoder)");
            } else {
                attached.push(ImageSource::Path(PathBuf::from(path.trim())));
            }
            continue;
        }
        // As Llama 4's chat template renders a turn's image items: one `<|image|>` each, before the text.
        let content = "<|image|>".repeat(attached.len()) + line;
        messages.push(Message {
            role: "user".into(),
            content,
        });
        let turn_images = attached.len();
        images.append(&mut attached);
        let prompt = if images.is_empty() {
            Prompt::Chat(messages.clone())
        } else {
            Prompt::WithImages {
                prompt: Box::new(Prompt::Chat(messages.clone())),
                images: images.clone(),
            }
        };
        let stream = match model.stream(prompt, &params, None) {
            Ok(stream) => stream,
            Err(e) => {
                // A bad image or an over-long conversation drops this turn, not the session.
                eprintln!("error: {e}");
                messages.pop();
                images.truncate(images.len() - turn_images);
                continue;
            }
        };
        let mut reply = String::new();
        for event in stream {
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
