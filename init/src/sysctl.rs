//! The kernel's settings for the application: the configuration's `sysctl` entries, memory
//! management that makes a guest out of memory end within seconds and say so, and a kernel
//! that stays off the console while the guest powers off.
//!
//! Without help, a guest whose application outgrows its memory does not meet the OOM killer
//! for minutes: the kernel keeps reclaiming the page cache of the programs' own files (the
//! root image's, decompressed again at every fault) and counts that as progress, so the
//! guest thrashes with nothing on the console. The multi-generational LRU with a minimum
//! working-set age (`min_ttl_ms`) calls the OOM killer instead when the last second's working
//! set no longer fits. The OOM killer never picks PID 1, so its victim is the application or
//! one of its processes, and the init reports the kill before the status line.

use std::collections::BTreeMap;
use std::io::Write as _;

use oci2uk_config::model::{check_sysctl_key, sysctl_path};

use crate::console::{self, step};

/// Set before the configuration's entries, which may override them: the OOM killer kills a
/// process rather than the kernel panicking (the kernel's default, made explicit); and no
/// watermark boost. The boost raises the free-memory watermark by up to 4 MiB after a
/// fragmentation event to make room for huge pages; in a guest of a few tens of MiB that is a
/// fifth of its memory, and with `min_ttl_ms` the reclaim it forces ends in the OOM killer
/// (nginx on the oci2uk kernel was killed at 64 MiB with 3 MiB free and served without it).
const DEFAULTS: [(&str, &str); 2] = [("vm.panic_on_oom", "0"), ("vm.watermark_boost_factor", "0")];

/// The multi-generational LRU and the working-set age it protects; a kernel without it
/// (`CONFIG_LRU_GEN`) keeps its classic LRU and the files are not there.
const LRU_GEN: [(&str, &str); 2] = [
    ("/sys/kernel/mm/lru_gen/enabled", "y"),
    ("/sys/kernel/mm/lru_gen/min_ttl_ms", "1000"),
];

/// Applies oci2uk's memory settings, then the configuration's sysctls. A setting the kernel
/// does not have, or refuses, is a warning: the application starts anyway.
pub fn apply(sysctl: &BTreeMap<String, String>) {
    for (path, value) in LRU_GEN {
        if let Err(e) = write_file(path, value) {
            step(|| format!("{path}: {e}"));
        }
    }
    for (key, value) in DEFAULTS {
        if !sysctl.contains_key(key) {
            if let Err(why) = write(key, value) {
                step(|| format!("sysctl {key}={value}: {why}"));
            }
        }
    }
    for (key, value) in sysctl {
        match write(key, value) {
            Ok(()) => step(|| format!("sysctl {key}={value}")),
            Err(why) => console::warn(&format!("sysctl {key}={value}: {why}")),
        }
    }
}

/// Writes one sysctl by its dotted name.
fn write(key: &str, value: &str) -> Result<(), String> {
    check_sysctl_key(key)?;
    write_file(&sysctl_path(key), value).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => "the kernel has no such setting".to_owned(),
        _ => format!("the kernel refused it: {e}"),
    })
}

/// Writes `value` into an existing file (a file under /proc/sys or /sys is never created).
fn write_file(path: &str, value: &str) -> std::io::Result<()> {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)?
        .write_all(value.as_bytes())
}

/// What happens between the application's end and the status line: a line when the OOM
/// killer killed anything, then the kernel's console silenced (unless debugging) so that
/// the status line is the console's last (the kernel's `reboot: Power down` is an
/// emergency-level message that no `loglevel=` above 0 hides).
pub fn at_end() {
    let kills = counter("/proc/vmstat", "oom_kill").unwrap_or(0);
    if kills > 0 {
        console::line(&oom_line(kills, counter("/proc/meminfo", "MemTotal:")));
    }
    if !console::debug_on() {
        let _ = write_file("/proc/sys/kernel/printk", "0");
    }
}

/// The line that says the guest ran out of memory.
fn oom_line(kills: u64, mem_total_kib: Option<u64>) -> String {
    let what = if kills == 1 {
        "1 process".to_owned()
    } else {
        format!("{kills} processes")
    };
    let has = mem_total_kib
        .map(|k| format!("the guest has {} MiB; ", k / 1024))
        .unwrap_or_default();
    format!(
        "oci2uk: out of memory: the kernel's OOM killer killed {what} ({has}give it more with `oci2uk run -m`)"
    )
}

/// The number after `name` in a `NAME VALUE` file (`/proc/vmstat`, `/proc/meminfo`).
fn counter(file: &str, name: &str) -> Option<u64> {
    let text = std::fs::read_to_string(file).ok()?;
    find_counter(&text, name)
}

fn find_counter(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let mut words = l.split_whitespace();
        (words.next()? == name)
            .then(|| words.next()?.parse().ok())
            .flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters() {
        let vmstat = "oom_kill_x 5\noom_kill 2\nfoo 1\n";
        assert_eq!(find_counter(vmstat, "oom_kill"), Some(2));
        assert_eq!(find_counter(vmstat, "bar"), None);
        let meminfo = "MemTotal:         158232 kB\nMemFree:          124332 kB\n";
        assert_eq!(find_counter(meminfo, "MemTotal:"), Some(158232));
    }

    #[test]
    fn the_oom_line() {
        assert_eq!(
            oom_line(1, Some(158232)),
            "oci2uk: out of memory: the kernel's OOM killer killed 1 process \
             (the guest has 154 MiB; give it more with `oci2uk run -m`)"
        );
        assert!(oom_line(3, None).contains("killed 3 processes (give"));
    }

    #[test]
    fn bad_names_are_not_written() {
        assert!(write("../../etc/passwd", "x").is_err());
        assert!(write("vm/x", "x").is_err());
    }
}
