//! A streaming upstream for the gateway benchmark (`bench/gateway.py`).
//!
//! Why not llm-sim: its batching engine and per-token JSON rendering cost
//! more CPU per stream than the proxy under test, so on two shared cores it,
//! not Envoy, would set the throughput. This responder answers every request
//! with the same pre-rendered OpenAI-style SSE stream (`--events` events: a
//! role chunk, content chunks, a usage chunk, `[DONE]`), each event in its own
//! `write()` and HTTP chunk, so the filter sees a realistic event stream at a
//! small, constant upstream cost.
//!
//! Deliberately standard-library only and outside the Cargo workspace: the
//! benchmark compiles it with plain `rustc -O` into its own output folder.
//!
//! Usage: `gateway_sse_upstream --port 0 --events 64 [--gap-us 0]`; prints
//! `listening on 127.0.0.1:<port>` once it accepts connections. Binds only
//! 127.0.0.1.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

/// More connections than any benchmark opens; beyond it new ones are closed.
const MAX_CONNECTIONS: usize = 1024;
/// Request heads or bodies larger than this end the connection.
const MAX_REQUEST_BYTES: usize = 1 << 20;

struct Options {
    port: u16,
    events: usize,
    gap: Duration,
}

fn parse_options() -> Result<Options, String> {
    let mut options = Options {
        port: 0,
        events: 64,
        gap: Duration::ZERO,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let bad = |e: std::num::ParseIntError| format!("{flag} {value}: {e}");
        match flag.as_str() {
            "--port" => options.port = value.parse().map_err(bad)?,
            "--events" => options.events = value.parse().map_err(bad)?,
            "--gap-us" => options.gap = Duration::from_micros(value.parse().map_err(bad)?),
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    if options.events < 3 {
        return Err("--events must be at least 3 (role, usage, [DONE])".into());
    }
    Ok(options)
}

/// The response: head, then one HTTP chunk per SSE event, then the last chunk.
fn render_stream(events: usize) -> (Vec<u8>, Vec<Vec<u8>>) {
    let head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n"
        .to_vec();
    let id = "chatcmpl-bench0000000000000000000000000000";
    let created = 1_700_000_000;
    let content_events = events - 3;
    let mut payloads = Vec::with_capacity(events);
    payloads.push(format!(
        r#"{{"id":"{id}","object":"chat.completion.chunk","created":{created},"model":"mistral-7b","choices":[{{"index":0,"delta":{{"role":"assistant","content":""}},"logprobs":null,"finish_reason":null}}]}}"#
    ));
    for i in 0..content_events {
        let finish = if i + 1 == content_events {
            r#""stop""#
        } else {
            "null"
        };
        payloads.push(format!(
            r#"{{"id":"{id}","object":"chat.completion.chunk","created":{created},"model":"mistral-7b","choices":[{{"index":0,"delta":{{"content":" tok{i}"}},"logprobs":null,"finish_reason":{finish}}}]}}"#
        ));
    }
    let prompt_tokens = 9;
    payloads.push(format!(
        r#"{{"id":"{id}","object":"chat.completion.chunk","created":{created},"model":"mistral-7b","choices":[],"usage":{{"prompt_tokens":{prompt_tokens},"total_tokens":{},"completion_tokens":{content_events}}}}}"#,
        prompt_tokens + content_events
    ));
    payloads.push("[DONE]".to_string());
    let chunks = payloads
        .iter()
        .map(|p| {
            let event = format!("data: {p}\n\n");
            let mut chunk = format!("{:x}\r\n", event.len()).into_bytes();
            chunk.extend_from_slice(event.as_bytes());
            chunk.extend_from_slice(b"\r\n");
            chunk
        })
        .collect();
    (head, chunks)
}

/// What a request asked of the connection.
enum Next {
    /// Answer, then read the next request.
    KeepAlive,
    /// Answer, then close (`connection: close`).
    Close,
    /// The client closed the connection between requests.
    Gone,
}

/// Reads one request (head and body) off a keep-alive connection.
fn read_request(reader: &mut BufReader<TcpStream>) -> io::Result<Next> {
    let mut content_length = 0usize;
    let mut chunked = false;
    let mut close = false;
    let mut head_bytes = 0usize;
    let mut line = String::new();
    let mut first = true;
    loop {
        line.clear();
        let n = reader.read_line(&mut line)?;
        if n == 0 {
            return if first {
                Ok(Next::Gone)
            } else {
                Err(io::ErrorKind::UnexpectedEof.into())
            };
        }
        first = false;
        head_bytes += n;
        if head_bytes > MAX_REQUEST_BYTES {
            return Err(io::ErrorKind::InvalidData.into());
        }
        let trimmed = line.trim_end();
        if trimmed.is_empty() {
            break;
        }
        if let Some((name, value)) = trimmed.split_once(':') {
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                content_length = value
                    .parse()
                    .map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?;
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = value.eq_ignore_ascii_case("chunked");
            } else if name.eq_ignore_ascii_case("connection") {
                close = value.eq_ignore_ascii_case("close");
            }
        }
    }
    let next = if close { Next::Close } else { Next::KeepAlive };
    if chunked {
        loop {
            line.clear();
            reader.read_line(&mut line)?;
            let size_text = line.trim_end().split(';').next().unwrap_or("");
            let size = usize::from_str_radix(size_text, 16)
                .map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?;
            if size > MAX_REQUEST_BYTES {
                return Err(io::ErrorKind::InvalidData.into());
            }
            // The chunk and its CRLF; after the last chunk, the final CRLF.
            io::copy(&mut reader.by_ref().take(size as u64 + 2), &mut io::sink())?;
            if size == 0 {
                return Ok(next);
            }
        }
    }
    if content_length > MAX_REQUEST_BYTES {
        return Err(io::ErrorKind::InvalidData.into());
    }
    io::copy(
        &mut reader.by_ref().take(content_length as u64),
        &mut io::sink(),
    )?;
    Ok(next)
}

fn serve(stream: TcpStream, head: &[u8], chunks: &[Vec<u8>], gap: Duration) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    loop {
        let next = read_request(&mut reader)?;
        if matches!(next, Next::Gone) {
            return Ok(());
        }
        writer.write_all(head)?;
        for chunk in chunks {
            if !gap.is_zero() {
                thread::sleep(gap);
            }
            writer.write_all(chunk)?;
        }
        writer.write_all(b"0\r\n\r\n")?;
        if matches!(next, Next::Close) {
            return Ok(());
        }
    }
}

fn main() {
    let options = match parse_options() {
        Ok(o) => o,
        Err(message) => {
            eprintln!("gateway_sse_upstream: {message}");
            std::process::exit(2);
        }
    };
    let listener = match TcpListener::bind((Ipv4Addr::LOCALHOST, options.port)) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("gateway_sse_upstream: bind 127.0.0.1:{}: {e}", options.port);
            std::process::exit(1);
        }
    };
    let port = listener.local_addr().map_or(options.port, |a| a.port());
    let (head, chunks) = render_stream(options.events);
    let response = Arc::new((head, chunks));
    let open = Arc::new(AtomicUsize::new(0));
    println!("listening on 127.0.0.1:{port}");
    let _ = io::stdout().flush();
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        if open.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            open.fetch_sub(1, Ordering::SeqCst);
            continue;
        }
        let response = Arc::clone(&response);
        let open_in_thread = Arc::clone(&open);
        let gap = options.gap;
        let spawned = thread::Builder::new().stack_size(64 * 1024).spawn(move || {
            // A peer that goes away mid-response is normal under load.
            let _ = serve(stream, &response.0, &response.1, gap);
            open_in_thread.fetch_sub(1, Ordering::SeqCst);
        });
        if spawned.is_err() {
            open.fetch_sub(1, Ordering::SeqCst);
            eprintln!("gateway_sse_upstream: cannot spawn a connection thread");
        }
    }
}
