//! The subject service on its own, for the tests: see `handover_harness::subject`.

fn main() -> std::process::ExitCode {
    handover_harness::subject::main(std::env::args().skip(1))
}
