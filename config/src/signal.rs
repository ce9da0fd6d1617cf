//! Signal names and numbers as container images spell them, with Linux's numbers.
//!
//! An image's `StopSignal` is `SIGQUIT`, `QUIT`, `sigquit`, `3` or `SIGRTMIN+3`, as docker
//! accepts them; the numbers are Linux's on x86_64 and arm64 (the generic numbering).

const NAMES: &[(&str, i32)] = &[
    ("HUP", 1),
    ("INT", 2),
    ("QUIT", 3),
    ("ILL", 4),
    ("TRAP", 5),
    ("ABRT", 6),
    ("IOT", 6),
    ("BUS", 7),
    ("FPE", 8),
    ("KILL", 9),
    ("USR1", 10),
    ("SEGV", 11),
    ("USR2", 12),
    ("PIPE", 13),
    ("ALRM", 14),
    ("TERM", 15),
    ("STKFLT", 16),
    ("CHLD", 17),
    ("CONT", 18),
    ("STOP", 19),
    ("TSTP", 20),
    ("TTIN", 21),
    ("TTOU", 22),
    ("URG", 23),
    ("XCPU", 24),
    ("XFSZ", 25),
    ("VTALRM", 26),
    ("PROF", 27),
    ("WINCH", 28),
    ("IO", 29),
    ("POLL", 29),
    ("PWR", 30),
    ("SYS", 31),
];

/// The C library's first real-time signal (glibc and musl keep 32 and 33 for themselves).
const RTMIN: i32 = 34;
const RTMAX: i32 = 64;

/// The number of a signal given by name (with or without `SIG`, any case) or number; `None`
/// when it is neither.
pub fn parse_signal(s: &str) -> Option<i32> {
    let s = s.trim();
    if let Ok(n) = s.parse::<i32>() {
        return (1..=RTMAX).contains(&n).then_some(n);
    }
    let upper = s.to_ascii_uppercase();
    let name = upper.strip_prefix("SIG").unwrap_or(&upper);
    if let Some(&(_, n)) = NAMES.iter().find(|(n, _)| *n == name) {
        return Some(n);
    }
    let rt = |base: i32, rest: &str| -> Option<i32> {
        let n = if rest.is_empty() {
            base
        } else if let Some(k) = rest.strip_prefix('+') {
            base + k.parse::<i32>().ok()?
        } else if let Some(k) = rest.strip_prefix('-') {
            base - k.parse::<i32>().ok()?
        } else {
            return None;
        };
        (RTMIN..=RTMAX).contains(&n).then_some(n)
    };
    if let Some(rest) = name.strip_prefix("RTMIN") {
        return rt(RTMIN, rest);
    }
    if let Some(rest) = name.strip_prefix("RTMAX") {
        return rt(RTMAX, rest);
    }
    None
}

/// The conventional name of a signal number (`SIGTERM`), for messages.
pub fn signal_name(n: i32) -> Option<String> {
    if let Some((name, _)) = NAMES.iter().find(|(_, k)| *k == n) {
        return Some(format!("SIG{name}"));
    }
    (RTMIN..=RTMAX)
        .contains(&n)
        .then(|| format!("SIGRTMIN+{}", n - RTMIN))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_numbers() {
        for (s, n) in [
            ("SIGTERM", 15),
            ("TERM", 15),
            ("sigquit", 3),
            ("Quit", 3),
            ("9", 9),
            ("SIGWINCH", 28),
            ("SIGRTMIN", 34),
            ("SIGRTMIN+3", 37),
            ("RTMAX-1", 63),
            (" SIGUSR1 ", 10),
        ] {
            assert_eq!(parse_signal(s), Some(n), "{s}");
        }
        for s in ["", "0", "65", "SIGNOPE", "RTMIN+40", "RTMIN3", "-1"] {
            assert_eq!(parse_signal(s), None, "{s}");
        }
        assert_eq!(signal_name(15).as_deref(), Some("SIGTERM"));
        assert_eq!(signal_name(36).as_deref(), Some("SIGRTMIN+2"));
        assert_eq!(signal_name(0), None);
    }
}
