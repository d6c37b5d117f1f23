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

/// The longest chat line herd reads (longer ones are skipped whole, not buffered).
const MAX_LINE_BYTES: u64 = 64 << 20;

/// One line of standard input.
enum Line {
    Text(String),
    /// A line that is not text herd takes (not UTF-8, or too long): the session goes on.
    Refused(String),
    End,
}

/// Reads one line, at most [`MAX_LINE_BYTES`] of it into memory.
fn read_line<R: std::io::BufRead>(input: &mut R) -> Result<Line> {
    let mut bytes = Vec::new();
    let n = std::io::Read::take(&mut *input, MAX_LINE_BYTES + 1).read_until(b'\n', &mut bytes)?;
    if n == 0 {
        return Ok(Line::End);
    }
    if bytes.len() as u64 > MAX_LINE_BYTES && bytes.last() != Some(&b'\n') {
        // Skip the rest of the line without keeping it.
        loop {
            let buf = input.fill_buf()?;
            if buf.is_empty() {
                break;
            }
            match buf.iter().position(|&b| b == b'\n') {
                Some(i) => {
                    input.consume(i + 1);
                    break;
                }
                None => {
                    let len = buf.len();
                    input.consume(len);
                }
            }
        }
        return Ok(Line::Refused(format!(
            "the line is longer than {MAX_LINE_BYTES} bytes"
        )));
    }
    Ok(match String::from_utf8(bytes) {
        Ok(text) => Line::Text(text),
        Err(_) => Line::Refused("the line is not UTF-8 text".into()),
    })
}

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
        let line = match read_line(&mut stdin.lock())? {
            Line::End => break,
            Line::Text(line) => line,
            Line::Refused(why) => {
                eprintln!("error: {why}; the line was ignored");
                continue;
            }
        };
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
