//! `herd serve` over real HTTP on 127.0.0.1: completions and chats (plain, streamed, with an image)
//! equal to the runtime's own generation, 16 concurrent requests each equal to their solo text, every
//! error status a hostile client can cause, a disconnecting client's row cancelled, and SIGTERM draining
//! the request in flight.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use common::{fixture, ok};
use herd_runtime::{GenerateParams, Message, Model, Prompt, RuntimeOptions, Sampling};
use serde_json::{json, Value};

const KEY: &str = "test-key";

struct Server {
    child: Child,
    url: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(bundle: &std::path::Path, extra: &[&str]) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_herd"))
        .args([
            "serve",
            bundle.to_str().unwrap(),
            "--port",
            "0",
            "--api-key",
            KEY,
        ])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .trim_end_matches("/v1")
        .to_string();
    Server { child, url }
}

fn bundle(dir: &std::path::Path) -> std::path::PathBuf {
    bundle_named(dir, "tiny-scout", &[])
}

/// tiny-scout compiled into `dir/name` with `extra` compile arguments.
fn bundle_named(dir: &std::path::Path, name: &str, extra: &[&str]) -> std::path::PathBuf {
    let out = dir.join(name);
    let (model, path) = (fixture("tiny-scout"), out.to_str().unwrap().to_string());
    let mut args = vec!["compile", model.to_str().unwrap(), "-o", &path];
    args.extend(["--max-context", "512"]);
    args.extend_from_slice(extra);
    ok(&args);
    out
}

fn post(server: &Server, path: &str, body: &Value) -> Result<Value, (u16, Value)> {
    match ureq::post(&format!("{}{path}", server.url))
        .set("Authorization", &format!("Bearer {KEY}"))
        .send_json(body.clone())
    {
        Ok(r) => Ok(r.into_json().unwrap()),
        Err(ureq::Error::Status(code, r)) => Err((code, r.into_json().unwrap_or(Value::Null))),
        Err(e) => panic!("{path}: {e}"),
    }
}

fn status(server: &Server, path: &str, key: Option<&str>, body: &str) -> u16 {
    let mut request =
        ureq::post(&format!("{}{path}", server.url)).set("Content-Type", "application/json");
    if let Some(k) = key {
        request = request.set("Authorization", &format!("Bearer {k}"));
    }
    match request.send_string(body) {
        Ok(r) => r.status(),
        Err(ureq::Error::Status(code, _)) => code,
        Err(e) => panic!("{path}: {e}"),
    }
}

/// The status line a server answers to a POST declaring a `length`-byte JSON body (only the headers sent).
fn raw_status(server: &Server, length: usize) -> String {
    use std::io::{Read, Write};
    let address = server.url.trim_start_matches("http://");
    let mut socket = std::net::TcpStream::connect(address).unwrap();
    write!(
        socket,
        "POST /v1/completions HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\nContent-Length: {length}\r\nConnection: close\r\n\r\n{{"
    )
    .unwrap();
    let mut head = [0u8; 64];
    let n = socket.read(&mut head).unwrap();
    String::from_utf8_lossy(&head[..n]).into_owned()
}

/// The text deltas of a streamed response, its finish reason, and whether it ended with [DONE].
fn stream(server: &Server, path: &str, body: &Value) -> (String, String, bool) {
    let mut body = body.clone();
    body["stream"] = json!(true);
    let response = ureq::post(&format!("{}{path}", server.url))
        .set("Authorization", &format!("Bearer {KEY}"))
        .send_json(body)
        .unwrap();
    let (mut text, mut reason, mut done) = (String::new(), String::new(), false);
    for line in BufReader::new(response.into_reader()).lines() {
        let line = line.unwrap();
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            done = true;
            break;
        }
        let chunk: Value = serde_json::from_str(data).unwrap();
        let choice = &chunk["choices"][0];
        let delta = choice["text"]
            .as_str()
            .or(choice["delta"]["content"].as_str())
            .unwrap_or("");
        text.push_str(delta);
        if let Some(r) = choice["finish_reason"].as_str() {
            reason = r.to_string();
        }
    }
    (text, reason, done)
}

/// What the runtime itself generates (greedy, no stop ids) for `prompt`.
fn solo(model: &Model, prompt: Prompt, n: usize) -> String {
    let params = GenerateParams {
        max_new_tokens: n,
        sampling: Sampling::Greedy,
        stop_ids: Some(vec![]),
        stop_strings: vec![],
        return_logits: false,
    };
    model
        .stream(prompt, &params, None)
        .unwrap()
        .map(|e| e.unwrap().text)
        .collect()
}

/// The texts of `n`-token greedy completions of `prompts`, all sent at once.
fn concurrent_completions(server: &Server, prompts: &[String], n: usize) -> Vec<String> {
    std::thread::scope(|s| {
        let handles: Vec<_> = prompts
            .iter()
            .map(|p| {
                s.spawn(move || {
                    let r = post(server, "/v1/completions", &completion(p, n)).unwrap();
                    r["choices"][0]["text"].as_str().unwrap().to_string()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn completion(prompt: &str, n: usize) -> Value {
    json!({"model": "tiny-scout", "prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": true})
}

#[test]
fn completions_and_chats_equal_the_runtime_and_concurrent_requests_are_exact() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = bundle(dir.path());
    let model = Model::load(&bundle, &RuntimeOptions::default()).unwrap();
    let server = start(&bundle, &["--max-batch", "4"]);

    let models = ureq::get(&format!("{}/v1/models", server.url))
        .set("Authorization", &format!("Bearer {KEY}"))
        .call()
        .unwrap()
        .into_json::<Value>()
        .unwrap();
    assert_eq!(models["data"][0]["id"], "tiny-scout");

    let expected = solo(&model, Prompt::Text("The weather today".into()), 12);
    let plain = post(
        &server,
        "/v1/completions",
        &completion("The weather today", 12),
    )
    .unwrap();
    assert_eq!(plain["choices"][0]["text"], expected.as_str());
    assert_eq!(plain["choices"][0]["finish_reason"], "length");
    assert_eq!(plain["usage"]["completion_tokens"], 12);
    let (text, reason, done) = stream(
        &server,
        "/v1/completions",
        &completion("The weather today", 12),
    );
    assert_eq!(
        (text.as_str(), reason.as_str(), done),
        (expected.as_str(), "length", true)
    );

    let messages = vec![Message {
        role: "user".into(),
        content: "Say something.".into(),
    }];
    let expected = solo(&model, Prompt::Chat(messages), 10);
    let request = json!({"model": "tiny-scout", "messages": [{"role": "user", "content": "Say something."}],
        "max_tokens": 10, "temperature": 0, "ignore_eos": true});
    let chat = post(&server, "/v1/chat/completions", &request).unwrap();
    assert_eq!(chat["choices"][0]["message"]["content"], expected.as_str());
    assert_eq!(chat["object"], "chat.completion");
    let (text, _, done) = stream(&server, "/v1/chat/completions", &request);
    assert_eq!((text.as_str(), done), (expected.as_str(), true));

    // An image as a data: URI, in the content parts.
    let png = std::fs::read(fixture("images").join("small.png")).unwrap();
    let uri = format!(
        "data:image/png;base64,{}",
        base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &png)
    );
    let image_prompt = Prompt::WithImages {
        prompt: Box::new(Prompt::Chat(vec![Message {
            role: "user".into(),
            content: "<|image|>What is this?".into(),
        }])),
        images: vec![herd_runtime::vision::ImageSource::Path(
            fixture("images").join("small.png"),
        )],
    };
    let expected = solo(&model, image_prompt, 8);
    let request = json!({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": uri}}, {"type": "text", "text": "What is this?"}]}],
        "max_tokens": 8, "temperature": 0, "ignore_eos": true});
    let chat = post(&server, "/v1/chat/completions", &request).unwrap();
    assert_eq!(chat["choices"][0]["message"]["content"], expected.as_str());

    // A stop sequence ends the text before it.
    let full = solo(&model, Prompt::Text("Once upon".into()), 16);
    let cut: String = full.chars().skip(3).take(2).collect();
    assert_eq!(
        cut.chars().count(),
        2,
        "the fixture's text {full:?} is long enough"
    );
    let mut request = completion("Once upon", 16);
    request["stop"] = json!(cut);
    let stopped = post(&server, "/v1/completions", &request).unwrap();
    let text = stopped["choices"][0]["text"].as_str().unwrap();
    assert_eq!(text, &full[..full.find(&cut).unwrap()]);
    assert_eq!(stopped["choices"][0]["finish_reason"], "stop");

    // 16 concurrent requests through 4 slots: each gets its solo text.
    let prompts: Vec<String> = (0..16)
        .map(|i| format!("Request number {i} asks"))
        .collect();
    let alone: Vec<String> = prompts
        .iter()
        .map(|p| solo(&model, Prompt::Text(p.clone()), 7))
        .collect();
    let answers = concurrent_completions(&server, &prompts, 7);
    assert_eq!(answers, alone);

    let metrics = ureq::get(&format!("{}/metrics", server.url))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    assert!(metrics.contains("herd_requests_total{endpoint=\"/v1/completions\",status=\"200\"}"));
    assert!(metrics.contains("herd_time_to_first_token_seconds_count"));
}

#[test]
fn a_staged_bundle_serves_concurrent_requests_in_micro_batches_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let single = bundle(dir.path());
    let model = Model::load(&single, &RuntimeOptions::default()).unwrap();
    let staged = bundle_named(dir.path(), "staged", &["--stages", "2"]);
    // 4 slots in 2 micro-batches (one per stage, the default) through the two stages together.
    let server = start(&staged, &["--max-batch", "4", "--model-name", "tiny-scout"]);
    let prompts: Vec<String> = (0..8).map(|i| format!("Staged request {i} says")).collect();
    let alone: Vec<String> = prompts
        .iter()
        .map(|p| solo(&model, Prompt::Text(p.clone()), 6))
        .collect();
    let answers = concurrent_completions(&server, &prompts, 6);
    assert_eq!(answers, alone);
}

#[test]
fn hostile_clients_get_their_status_and_the_server_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = bundle(dir.path());
    let server = start(
        &bundle,
        &[
            "--max-batch",
            "1",
            "--max-queue",
            "1",
            "--max-body",
            "65536",
            "--body-timeout",
            "0.5",
        ],
    );
    let good = completion("Hello", 4).to_string();
    assert_eq!(status(&server, "/v1/completions", None, &good), 401);
    assert_eq!(
        status(&server, "/v1/completions", Some("wrong"), &good),
        401
    );
    assert_eq!(
        status(&server, "/v1/completions", Some(KEY), "{not json"),
        400
    );
    assert_eq!(
        status(&server, "/v1/completions", Some(KEY), "{\"prompt\": 5}"),
        400
    );
    // A body over --max-body is refused from its Content-Length, before it is sent; one that never
    // arrives gets 408 after --body-timeout.
    assert!(raw_status(&server, 100_000).starts_with("HTTP/1.1 413"));
    assert!(raw_status(&server, 1_000).starts_with("HTTP/1.1 408"));
    let mut other = completion("Hello", 4);
    other["model"] = json!("gpt-4");
    assert_eq!(post(&server, "/v1/completions", &other).unwrap_err().0, 404);
    let long: Vec<i64> = vec![5; 600];
    let (code, error) = post(
        &server,
        "/v1/completions",
        &json!({"prompt": long, "max_tokens": 4}),
    )
    .unwrap_err();
    assert_eq!(code, 400);
    assert_eq!(error["error"]["code"], "context_length_exceeded");
    for bad in [
        json!({"temperature": 5}),
        json!({"top_p": 0}),
        json!({"n": 3}),
        json!({"max_tokens": 0}),
    ] {
        let mut request = completion("Hello", 4);
        for (k, v) in bad.as_object().unwrap() {
            request[k] = v.clone();
        }
        assert_eq!(
            post(&server, "/v1/completions", &request).unwrap_err().0,
            400,
            "{bad}"
        );
    }
    let remote = json!({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}]});
    assert_eq!(
        post(&server, "/v1/chat/completions", &remote)
            .unwrap_err()
            .0,
        400
    );

    // One slot, one queue place: of four long requests at once, some are turned away with 429.
    let codes: Vec<u16> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let server = &server;
                s.spawn(
                    move || match post(server, "/v1/completions", &completion("Hi", 500)) {
                        Ok(_) => 200,
                        Err((code, _)) => code,
                    },
                )
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(codes.contains(&429), "{codes:?}");
    assert!(codes.contains(&200), "{codes:?}");
    // And it still serves.
    assert!(post(&server, "/v1/completions", &completion("Hello", 4)).is_ok());
}

#[test]
fn a_disconnecting_client_is_cancelled_and_sigterm_drains() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = bundle(dir.path());
    let mut server = start(&bundle, &["--max-batch", "2"]);
    // Read one streamed event, then hang up: the row is cancelled (the batch empties long before 500
    // tokens would be done).
    let mut request = completion("Story:", 500);
    request["stream"] = json!(true);
    let response = ureq::post(&format!("{}/v1/completions", server.url))
        .set("Authorization", &format!("Bearer {KEY}"))
        .send_json(request)
        .unwrap();
    let mut reader = BufReader::new(response.into_reader());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert!(line.starts_with("data: "), "{line}");
    drop(reader);
    let running = || {
        let text = ureq::get(&format!("{}/metrics", server.url))
            .call()
            .unwrap()
            .into_string()
            .unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix("herd_batch_running "))
            .map(|v| v.trim().to_string())
    };
    let mut cancelled = false;
    for _ in 0..100 {
        if running().as_deref() == Some("0") {
            cancelled = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(cancelled, "the row kept running after its client left");
    // Cancelled, not finished: far fewer than its 500 tokens were generated.
    let generated: u64 = ureq::get(&format!("{}/metrics", server.url))
        .call()
        .unwrap()
        .into_string()
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("herd_generated_tokens_total "))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        generated < 500,
        "{generated} tokens: the row ran to its end"
    );

    // SIGTERM while a request runs: it completes, then the server exits 0.
    let url = server.url.clone();
    let pid = server.child.id() as i32;
    let answer = std::thread::spawn(move || {
        ureq::post(&format!("{url}/v1/completions"))
            .set("Authorization", &format!("Bearer {KEY}"))
            .send_json(completion("Drain me", 400))
            .map(|r| r.into_json::<Value>().unwrap())
            .map_err(|e| e.to_string())
    });
    let mut started = false;
    for _ in 0..500 {
        if running().as_deref() == Some("1") {
            started = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    assert!(started, "the request to drain never ran");
    // SAFETY: sends a signal to our own child process.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let answer = answer
        .join()
        .unwrap()
        .expect("the request in flight completes");
    assert_eq!(answer["usage"]["completion_tokens"], 400);
    let exit = server.child.wait().unwrap();
    assert!(exit.success(), "{exit:?}");
}

/// A Llama Guard-style chat template with its category list (the fixture's weights are random, so
/// its verdicts are arbitrary: what is checked is that the server decides as the guard does).
const GUARD_TEMPLATE: &str = "{{ bos_token }}<|header_start|>user<|header_end|>\n\nTask: Check if there is unsafe content in the conversation according to our safety policy with the below categories.\n\n<BEGIN UNSAFE CONTENT CATEGORIES>\nS1: Violent Crimes.\nS2: Non-Violent Crimes.\n<END UNSAFE CONTENT CATEGORIES>\n\n<BEGIN CONVERSATION>\n\n{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n\n{% endfor %}<END CONVERSATION>\n\nProvide your safety assessment:<|eot|><|header_start|>assistant<|header_end|>\n\n";

/// Whether the guard bundle, run directly on the conversation, refuses it.
fn guard_says(guard: &Model, turns: &[Message]) -> bool {
    let codec = guard.text().unwrap();
    let ids = codec.encode_chat(turns, true).unwrap();
    let params = GenerateParams {
        max_new_tokens: 16,
        sampling: Sampling::Greedy,
        stop_ids: None,
        stop_strings: vec![],
        return_logits: false,
    };
    let out = guard.generate(&ids, &params).unwrap();
    let text = codec.decode(&out.tokens, true).unwrap();
    text.trim().lines().next().map(str::trim) == Some("unsafe")
}

#[test]
fn the_guard_decides_as_the_guard_bundle_does() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = bundle(dir.path());
    let source = dir.path().join("guard-checkpoint");
    std::fs::create_dir(&source).unwrap();
    for entry in std::fs::read_dir(fixture("tiny-maverick")).unwrap() {
        let entry = entry.unwrap();
        if !entry.file_name().to_string_lossy().starts_with("goldens") {
            std::fs::copy(entry.path(), source.join(entry.file_name())).unwrap();
        }
    }
    std::fs::write(source.join("chat_template.jinja"), GUARD_TEMPLATE).unwrap();
    let guard_bundle = dir.path().join("guard");
    ok(&[
        "compile",
        source.to_str().unwrap(),
        "-o",
        guard_bundle.to_str().unwrap(),
    ]);
    let model = Model::load(&bundle, &RuntimeOptions::default()).unwrap();
    let guard = Model::load(&guard_bundle, &RuntimeOptions::default()).unwrap();
    assert!(guard
        .text()
        .unwrap()
        .render(&[], true)
        .unwrap()
        .contains("S1: Violent Crimes."));
    let server = start(&bundle, &["--guard", guard_bundle.to_str().unwrap()]);
    let mut checks = 0;
    for prompt in ["How do I bake bread?", "Tell me a story.", "What is 2 + 2?"] {
        let turns = vec![Message {
            role: "user".into(),
            content: prompt.into(),
        }];
        let answer = solo(&model, Prompt::Chat(turns.clone()), 8);
        let mut with_answer = turns.clone();
        with_answer.push(Message {
            role: "assistant".into(),
            content: answer.clone(),
        });
        let before = guard_says(&guard, &turns);
        let after = !before && guard_says(&guard, &with_answer);
        checks += if before { 1 } else { 2 };
        let request = json!({"messages": [{"role": "user", "content": prompt}], "max_tokens": 8,
            "temperature": 0, "ignore_eos": true});
        let r = post(&server, "/v1/chat/completions", &request).unwrap();
        let choice = &r["choices"][0];
        if before || after {
            assert_eq!(choice["finish_reason"], "content_filter", "{prompt}");
            assert_eq!(
                choice["message"]["content"], "",
                "{prompt}: nothing unsafe is sent"
            );
            assert!(r["guard"]["category"].is_string());
        } else {
            assert_eq!(choice["finish_reason"], "length", "{prompt}");
            assert_eq!(choice["message"]["content"], answer.as_str(), "{prompt}");
        }
    }
    let metrics = ureq::get(&format!("{}/metrics", server.url))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    assert!(
        metrics.contains(&format!("herd_guard_checks_total {checks}\n")),
        "{metrics}"
    );
}

/// A guard prompt without the common letter pairs of the fixture tokenizer's merges, so that the
/// token the guard writes first is rarely one the prompt uses.
const TERSE_GUARD_TEMPLATE: &str = "{{ bos_token }}<|header_start|>user<|header_end|>\n\nTask: check.\n\n<BEGIN UNSAFE CONTENT CATEGORIES>\nS1: Violent Crimes.\n<END UNSAFE CONTENT CATEGORIES>\n\n{% for m in messages %}{{ m['content'] }}\n\n{% endfor %}<|eot|><|header_start|>assistant<|header_end|>\n\n";

/// A guard whose verdict is `unsafe`: the fixture guard's tokenizer is rewritten so that the first
/// token it writes for some prompt spells `unsafe` and a line break; the server must then refuse that
/// prompt with `content_filter` and send no text.
#[test]
fn an_unsafe_verdict_ends_the_response_with_content_filter() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = bundle(dir.path());
    let checkpoint = |name: &str, template: &str, tokenizer: Option<&Value>| {
        let source = dir.path().join(name);
        std::fs::create_dir(&source).unwrap();
        for entry in std::fs::read_dir(fixture("tiny-maverick")).unwrap() {
            let entry = entry.unwrap();
            if !entry.file_name().to_string_lossy().starts_with("goldens") {
                std::fs::copy(entry.path(), source.join(entry.file_name())).unwrap();
            }
        }
        std::fs::write(source.join("chat_template.jinja"), template).unwrap();
        if let Some(t) = tokenizer {
            std::fs::write(source.join("tokenizer.json"), t.to_string()).unwrap();
        }
        let out = dir.path().join(format!("{name}-bundle"));
        ok(&[
            "compile",
            source.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ]);
        out
    };
    let original = checkpoint("guard-a", TERSE_GUARD_TEMPLATE, None);
    let guard = Model::load(&original, &RuntimeOptions::default()).unwrap();
    let codec = guard.text().unwrap();
    let tokenizer: Value =
        serde_json::from_str(&std::fs::read_to_string(original.join("tokenizer.json")).unwrap())
            .unwrap();
    let one = GenerateParams {
        max_new_tokens: 1,
        sampling: Sampling::Greedy,
        stop_ids: Some(vec![]),
        stop_strings: vec![],
        return_logits: false,
    };
    // A prompt whose first verdict token the prompt itself does not use: a plain added token
    // (`<|reserved_N|>`) or a merged one; respelling it then changes none of the prompt's tokens.
    let added = tokenizer["added_tokens"].as_array().unwrap().clone();
    let vocab = tokenizer["model"]["vocab"].as_object().unwrap().clone();
    let found = (0..40).find_map(|i| {
        let prompt = format!("Question {i}: what now?");
        let turns = vec![Message {
            role: "user".into(),
            content: prompt.clone(),
        }];
        let ids = codec.encode_chat(&turns, true).unwrap();
        let first = guard.generate(&ids, &one).unwrap().tokens[0];
        if ids.contains(&first) {
            return None;
        }
        let reserved = added.iter().position(|t| {
            t["id"].as_i64() == Some(first)
                && t["special"] == false
                && t["content"]
                    .as_str()
                    .is_some_and(|c| c.starts_with("<|reserved_"))
        });
        let merged = vocab
            .iter()
            .find(|(_, id)| id.as_i64() == Some(first) && first >= 256)
            .map(|(text, _)| text.clone());
        (reserved.is_some() || merged.is_some()).then_some((prompt, turns, reserved, merged))
    });
    let Some((prompt, turns, reserved, merged)) = found else {
        panic!("no prompt starts the fixture guard's verdict with a token it can respell");
    };
    let mut patched = tokenizer.clone();
    if let Some(index) = reserved {
        patched["added_tokens"][index]["content"] = json!("unsafe\n");
    } else if let Some(spelled) = merged {
        let model = patched["model"].as_object_mut().unwrap();
        let vocab = model["vocab"].as_object_mut().unwrap();
        let id = vocab.remove(&spelled).unwrap();
        vocab.insert("unsafe\u{10a}".into(), id); // byte-level spelling of "unsafe\n"
        let merges: Vec<Value> = model["merges"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| {
                let (a, b) = (m[0].as_str().unwrap(), m[1].as_str().unwrap());
                a != spelled && b != spelled && format!("{a}{b}") != spelled
            })
            .cloned()
            .collect();
        model["merges"] = Value::Array(merges);
    }
    let unsafe_guard = checkpoint("guard-b", TERSE_GUARD_TEMPLATE, Some(&patched));
    let direct = Model::load(&unsafe_guard, &RuntimeOptions::default()).unwrap();
    assert!(
        guard_says(&direct, &turns),
        "the patched guard refuses {prompt:?}"
    );

    let server = start(&bundle, &["--guard", unsafe_guard.to_str().unwrap()]);
    let request = json!({"messages": [{"role": "user", "content": prompt}], "max_tokens": 8,
        "temperature": 0});
    let r = post(&server, "/v1/chat/completions", &request).unwrap();
    assert_eq!(r["choices"][0]["finish_reason"], "content_filter");
    assert_eq!(r["choices"][0]["message"]["content"], "");
    assert_eq!(r["usage"]["completion_tokens"], 0);
    assert!(r["guard"]["category"].is_string(), "{r}");
    let (text, reason, done) = stream(&server, "/v1/chat/completions", &request);
    assert_eq!(
        (text.as_str(), reason.as_str(), done),
        ("", "content_filter", true)
    );
}
