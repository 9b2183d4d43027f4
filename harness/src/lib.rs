//! The chaos harness for `handover`: a subject service, and the means to
//! drive it as real processes and check what they leave behind.
#![deny(missing_docs, rust_2018_idioms)]

pub mod blackbox;
pub mod check;
pub mod fault;
pub mod grpc;
pub mod load;
pub mod process;
pub mod report;
pub mod runner;
pub mod scenario;
pub mod subject;
pub mod systemd;
pub mod tls;

/// How many descriptors this process has open, counted portably from
/// `/dev/fd` (the listing's own descriptor excluded).
pub fn open_descriptors() -> usize {
    match std::fs::read_dir("/dev/fd") {
        Ok(entries) => entries.count().saturating_sub(1),
        Err(_) => 0,
    }
}

/// The numbers of the descriptors this process has open, in order, listed
/// portably from `/dev/fd` (the listing's own descriptor, closed by then,
/// left out).
pub fn open_descriptor_numbers() -> Vec<i32> {
    let listed: Vec<i32> = match std::fs::read_dir("/dev/fd") {
        Ok(entries) => entries
            .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
            .collect(),
        Err(_) => return Vec::new(),
    };
    let mut open: Vec<i32> = listed
        .into_iter()
        .filter(|fd| std::fs::symlink_metadata(format!("/dev/fd/{fd}")).is_ok())
        .collect();
    open.sort_unstable();
    open
}
