//! The chaos harness for `handover`: a subject service, and the means to
//! drive it as real processes and check what they leave behind.
#![deny(missing_docs, rust_2018_idioms)]

pub mod blackbox;
pub mod check;
pub mod fault;
pub mod load;
pub mod process;
pub mod report;
pub mod runner;
pub mod scenario;
pub mod subject;

/// How many descriptors this process has open, counted portably from
/// `/dev/fd` (the listing's own descriptor excluded).
pub fn open_descriptors() -> usize {
    match std::fs::read_dir("/dev/fd") {
        Ok(entries) => entries.count().saturating_sub(1),
        Err(_) => 0,
    }
}
