//! `handover`: ask a running service to upgrade, and say whether it worked.
//!
//! ```text
//! handover upgrade --socket /run/api/control.sock [--timeout 60s]
//! handover status  --socket /run/api/control.sock
//! ```
//!
//! Exit status: 0 when the upgrade succeeded (the new generation serves),
//! 1 when it did not happen (it failed, or was refused: `in_progress`,
//! `parent_alive`, ...; the generation that answered still serves, and the
//! reason is printed), 2 when the service could not be asked at all. An
//! answer `exiting` comes from a generation on its way out; the request is
//! sent again, and the generation serving now answers it. Fit for
//! `ExecReload=` and deploy scripts.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::ExitCode;
use std::time::Duration;

const USAGE: &str =
    "usage: handover upgrade|status --socket PATH [--timeout DURATION (60s, 500ms, 2m)]";

fn main() -> ExitCode {
    match run() {
        Ok(code) => code,
        Err(problem) => {
            eprintln!("handover: {problem}");
            ExitCode::from(2)
        }
    }
}

fn run() -> Result<ExitCode, String> {
    let mut words = std::env::args().skip(1);
    let request = words.next().ok_or(USAGE)?;
    if request != "upgrade" && request != "status" {
        return Err(format!("unknown request {request:?}\n{USAGE}"));
    }
    let mut socket = None;
    let mut timeout = Duration::from_secs(60);
    while let Some(flag) = words.next() {
        let value = words
            .next()
            .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))?;
        match flag.as_str() {
            "--socket" => socket = Some(value),
            "--timeout" => timeout = parse_duration(&value)?,
            other => return Err(format!("unknown flag {other}\n{USAGE}")),
        }
    }
    let socket = socket.ok_or(USAGE)?;
    // A generation in its last moments answers `exiting`: nothing was done,
    // and its successor, on the same socket, takes the next connection.
    let mut answer = ask(&socket, &request, timeout)?;
    for _ in 0..RETRIES_WHEN_EXITING {
        if !answer.contains("reason=exiting") {
            break;
        }
        match ask(&socket, &request, timeout) {
            Ok(next) => answer = next,
            // No successor: a final stop. Report the exiting answer.
            Err(_) => break,
        }
    }
    let answer = answer.as_str();
    let field = |key: &str| {
        answer
            .split_whitespace()
            .find_map(|w| w.strip_prefix(key).and_then(|w| w.strip_prefix('=')))
            .unwrap_or("?")
            .to_owned()
    };
    if answer.starts_with("ok") {
        if request == "upgrade" {
            let micros: f64 = field("duration_us").parse().unwrap_or(f64::NAN);
            println!(
                "upgraded: generation {} (pid {}) is serving, ready in {:.1} ms",
                field("generation"),
                field("pid"),
                micros / 1000.0
            );
        } else {
            println!(
                "serving: generation {} (pid {})",
                field("generation"),
                field("pid")
            );
        }
        Ok(ExitCode::SUCCESS)
    } else {
        let message = answer.split_once("message=").map_or(answer, |(_, m)| m);
        println!("{request} failed ({}): {message}", field("reason"));
        Ok(ExitCode::FAILURE)
    }
}

/// How many times a request answered `exiting` is sent again.
const RETRIES_WHEN_EXITING: usize = 3;

/// Sends one request and reads its one-line answer.
fn ask(socket: &str, request: &str, timeout: Duration) -> Result<String, String> {
    let mut stream =
        UnixStream::connect(socket).map_err(|e| format!("cannot reach {socket}: {e}"))?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    // A service that refuses at once answers and closes before reading: the
    // write then fails, but its answer is there to read.
    let sent = stream.write_all(format!("{request}\n").as_bytes());
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer).map_err(|e| {
        if matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ) {
            format!("no answer from {socket} within {timeout:?} (the upgrade may still be running)")
        } else {
            format!("no answer from {socket}: {e}")
        }
    })?;
    let answer = answer.trim();
    if answer.is_empty() {
        return Err(match sent {
            Err(e) => format!("cannot ask {socket}: {e}"),
            Ok(()) => format!("{socket} closed the connection without an answer"),
        });
    }
    Ok(answer.to_owned())
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let bad = || format!("{text:?} is not a duration (60s, 500ms, 2m)");
    let (number, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let number: u64 = number.parse().map_err(|_| bad())?;
    Ok(match unit {
        "ms" => Duration::from_millis(number),
        "s" | "" => Duration::from_secs(number),
        "m" => Duration::from_secs(number * 60),
        _ => return Err(bad()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_an_operator_writes_them() {
        assert_eq!(parse_duration("60s"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5h").is_err());
    }
}
