//! A server whose "reload" is a stop and a start, as a naive service or
//! `systemctl restart` does it: on SIGHUP it closes its listener, starts a
//! new copy of itself and exits, dropping every connection it holds. The
//! new copy binds the port again. `handover-harness check` must see the
//! outage (refused connections while the port is closed, resets on the
//! connections the old process dropped): tests/check.rs keeps that proof.
//!
//! ```text
//! handover-stop-start-toy --listen 127.0.0.1:8080 --pid-file /tmp/toy.pid
//! ```
//!
//! It answers every request on `/` with `200` and `pid=PID`, keeping the
//! connection alive.

use std::net::SocketAddr;
use std::process::ExitCode;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::signal::unix::{SignalKind, signal};

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
    };
    let Some(listen) = value("--listen").and_then(|a| a.parse::<SocketAddr>().ok()) else {
        eprintln!("usage: handover-stop-start-toy --listen ADDR [--pid-file PATH]");
        return ExitCode::from(2);
    };
    let listener = match TcpListener::bind(listen).await {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("toy: bind {listen}: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(path) = value("--pid-file") {
        let _ = std::fs::write(path, format!("{}\n", std::process::id()));
    }
    let Ok(mut hangup) = signal(SignalKind::hangup()) else {
        return ExitCode::FAILURE;
    };
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                if let Ok((stream, _)) = accepted {
                    tokio::spawn(serve(stream));
                }
            }
            _ = hangup.recv() => break,
        }
    }
    // The "reload": stop (the port closes), start again, leave.
    drop(listener);
    let started =
        std::env::current_exe().and_then(|exe| std::process::Command::new(exe).args(&args).spawn());
    match started {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("toy: restart: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(stream: TcpStream) {
    let body = format!("pid={}\n", std::process::id());
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    loop {
        // A request is its lines up to the empty one (GET, no body).
        loop {
            match lines.next_line().await {
                Ok(Some(line)) if line.is_empty() => break,
                Ok(Some(_)) => {}
                _ => return,
            }
        }
        let answer = format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        if write.write_all(answer.as_bytes()).await.is_err() {
            return;
        }
    }
}
