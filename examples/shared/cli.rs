//! The flag parsing the benchmark examples share: `--name value` pairs, nothing more.
#![allow(dead_code)] // each example takes the helpers it needs

/// The value after `name`, if the flag is there.
pub fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned()
}

/// The value after `name`; panics naming the flag when it is missing.
pub fn need(args: &[String], name: &str) -> String {
    arg(args, name).unwrap_or_else(|| panic!("{name} is required (see the file's docs)"))
}
