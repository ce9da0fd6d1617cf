//! Retries: which failures deserve another attempt, and how long to wait before it.
//!
//! Every transport failure (refused or reset connections, TLS failures, stalls, bodies that
//! break off) is retried; statuses are retried as [`retryable_status`] says.
//!
//! Registries and the CDNs behind them fail transiently (rate limits, restarts, dropped
//! connections), so every request is retried a bounded number of times with exponential
//! backoff and jitter, honouring `Retry-After` when the server gives one.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use reqwest::header::{HeaderMap, RETRY_AFTER};
use reqwest::{Response, StatusCode};

use super::transport;
use super::{Cause, RegistryError};

/// How often and how patiently to retry.
#[derive(Debug, Clone)]
pub(crate) struct Policy {
    /// Attempts in all (the first one included) before giving up.
    pub attempts: u32,
    /// The delay after the first failure; it doubles after each further one.
    pub base: Duration,
    /// The longest backoff delay.
    pub max_delay: Duration,
    /// The longest wait a `Retry-After` header can ask for.
    pub max_retry_after: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            attempts: 6,
            base: Duration::from_millis(500),
            max_delay: Duration::from_secs(20),
            max_retry_after: Duration::from_secs(60),
        }
    }
}

impl Policy {
    /// The wait after the `failures`-th consecutive failure (1-based): the server's
    /// `Retry-After` when it gave one (capped), else exponential backoff with "equal jitter"
    /// (a random point in the upper half of the window, so concurrent downloads that failed
    /// together do not retry together).
    pub fn delay(&self, failures: u32, retry_after: Option<Duration>) -> Duration {
        if let Some(d) = retry_after {
            return d.min(self.max_retry_after);
        }
        let exp = self
            .base
            .saturating_mul(1u32 << failures.saturating_sub(1).min(16))
            .min(self.max_delay);
        let half = exp / 2;
        half + half.mul_f64(random_fraction())
    }
}

/// The outcome of one failed attempt.
pub(crate) enum Failure {
    /// Worth another attempt, after `retry_after` if the server said so.
    Retry {
        /// What went wrong.
        cause: Cause,
        /// The server's `Retry-After`.
        retry_after: Option<Duration>,
    },
    /// Not worth another attempt.
    Fatal(RegistryError),
}

impl From<RegistryError> for Failure {
    fn from(e: RegistryError) -> Self {
        Self::Fatal(e)
    }
}

impl Failure {
    /// A retryable failure the server gave no `Retry-After` for.
    pub fn retry(cause: Cause) -> Self {
        Self::Retry {
            cause,
            retry_after: None,
        }
    }

    /// A retryable failure from a status that [`retryable_status`] accepts, with the
    /// server's `Retry-After` and error detail.
    pub async fn status(resp: Response) -> Self {
        Self::Retry {
            retry_after: retry_after(resp.headers(), SystemTime::now()),
            cause: Cause::Status {
                status: resp.status(),
                detail: transport::error_detail(resp).await,
            },
        }
    }
}

/// Counts the failed attempts at one request and waits between them.
pub(crate) struct Retrier<'a> {
    policy: &'a Policy,
    registry: &'a str,
    what: String,
    path: String,
    /// Consecutive failures without progress.
    failures: u32,
    /// All failures.
    total: u32,
}

impl<'a> Retrier<'a> {
    /// A count of no failures yet at `what` (for messages) on `path` of `registry`.
    pub fn new(policy: &'a Policy, registry: &'a str, what: String, path: String) -> Self {
        Self {
            policy,
            registry,
            what,
            path,
            failures: 0,
            total: 0,
        }
    }

    /// Handles a failed attempt: a fatal one is returned; a retryable one waits and returns
    /// `Ok` unless the attempts are used up.
    pub async fn wait(&mut self, f: Failure) -> Result<(), RegistryError> {
        let (cause, retry_after) = match f {
            Failure::Fatal(e) => return Err(e),
            Failure::Retry { cause, retry_after } => (cause, retry_after),
        };
        self.failures += 1;
        self.total += 1;
        // Progress resets the count (a slow, flaky link still gets there), within a bound.
        // An untrusted certificate will not become trusted by asking again.
        if self.failures >= self.policy.attempts
            || self.total >= self.policy.attempts * 4
            || !hint_for(&cause).is_empty()
        {
            return Err(RegistryError::Exhausted {
                what: std::mem::take(&mut self.what),
                registry: self.registry.to_string(),
                path: std::mem::take(&mut self.path),
                attempts: self.total,
                source: cause,
            });
        }
        let delay = self.policy.delay(self.failures, retry_after);
        tracing::debug!(
            what = %self.what,
            path = %self.path,
            attempt = self.total,
            delay_ms = delay.as_millis() as u64,
            cause = %cause,
            "retrying"
        );
        tokio::time::sleep(delay).await;
        Ok(())
    }

    /// Notes that the failed attempt still made progress.
    pub fn progressed(&mut self) {
        self.failures = 0;
    }
}

/// A hint for an unreachable registry, from its last error.
pub(crate) fn hint_for(cause: &Cause) -> &'static str {
    let mut source: Option<&dyn std::error::Error> = Some(cause);
    while let Some(e) = source {
        let text = e.to_string();
        if text.contains("certificate") || text.contains("UnknownIssuer") {
            return " (its TLS certificate is not trusted: use --ca-cert FILE, or --insecure)";
        }
        source = e.source();
    }
    ""
}

/// A number in [0, 1) that differs between calls; backoff jitter needs no better.
fn random_fraction() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// Whether an HTTP status is worth retrying: timeouts, rate limits and server errors (except
/// those that say the request can never work).
pub(crate) fn retryable_status(status: StatusCode) -> bool {
    status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
        || (status.is_server_error()
            && status != StatusCode::NOT_IMPLEMENTED
            && status != StatusCode::HTTP_VERSION_NOT_SUPPORTED)
}

/// The wait a response's `Retry-After` asks for: delay-seconds or an HTTP date.
pub(crate) fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = parse_http_date(value)?;
    Some(when.duration_since(now).unwrap_or(Duration::ZERO))
}

/// Parses the three date forms HTTP recipients must accept (RFC 9110 section 5.6.7):
/// `Sun, 06 Nov 1994 08:49:37 GMT`, `Sunday, 06-Nov-94 08:49:37 GMT` and
/// `Sun Nov  6 08:49:37 1994`.
pub(crate) fn parse_http_date(s: &str) -> Option<SystemTime> {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let month = |m: &str| MONTHS.iter().position(|x| *x == m).map(|i| i as u32 + 1);
    let words: Vec<&str> = s.split_whitespace().collect();
    let (year, mon, day, time) = match words.as_slice() {
        // IMF-fixdate.
        [wd, d, m, y, t, "GMT"] if wd.ends_with(',') => (
            y.parse::<i64>().ok()?,
            month(m)?,
            d.parse::<u32>().ok()?,
            *t,
        ),
        // RFC 850: two-digit years are this century's or the last's, whichever is nearer;
        // the obsolete form only ever named dates around its use, so 1970-2069 is enough.
        [wd, dmy, t, "GMT"] if wd.ends_with(',') => {
            let mut p = dmy.split('-');
            let (d, m, y) = (p.next()?, p.next()?, p.next()?);
            let y: i64 = y.parse().ok()?;
            let y = if y < 70 { 2000 + y } else { 1900 + y };
            (y, month(m)?, d.parse().ok()?, *t)
        }
        // asctime.
        [_, m, d, t, y] => (y.parse().ok()?, month(m)?, d.parse().ok()?, *t),
        _ => return None,
    };
    let mut hms = time.split(':').map(|x| x.parse::<u32>().ok());
    let (h, mi, se) = (hms.next()??, hms.next()??, hms.next()??);
    if hms.next().is_some() || !(1..=31).contains(&day) || h > 23 || mi > 59 || se > 60 {
        return None;
    }
    let days = days_from_civil(year, mon, day);
    let secs = days * 86_400 + i64::from(h) * 3600 + i64::from(mi) * 60 + i64::from(se);
    Some(UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).ok()?))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    fn headers(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, HeaderValue::from_str(v).unwrap());
        h
    }

    #[test]
    fn retry_after_seconds_and_dates() {
        let now = UNIX_EPOCH + Duration::from_secs(784_111_777); // Sun, 06 Nov 1994 08:49:37 GMT
        assert_eq!(
            retry_after(&headers("1"), now),
            Some(Duration::from_secs(1))
        );
        assert_eq!(
            retry_after(&headers(" 120 "), now),
            Some(Duration::from_secs(120))
        );
        for later in [
            "Sun, 06 Nov 1994 08:49:47 GMT",
            "Sunday, 06-Nov-94 08:49:47 GMT",
            "Sun Nov  6 08:49:47 1994",
        ] {
            assert_eq!(
                retry_after(&headers(later), now),
                Some(Duration::from_secs(10)),
                "{later}"
            );
        }
        // A date in the past means "now".
        assert_eq!(
            retry_after(&headers("Sat, 05 Nov 1994 08:49:37 GMT"), now),
            Some(Duration::ZERO)
        );
        for bad in [
            "soon",
            "-1",
            "1.5",
            "Sun, 06 Nov 1994 25:00:00 GMT",
            "Sun, 06 Foo 1994 08:49:37 GMT",
        ] {
            assert_eq!(retry_after(&headers(bad), now), None, "{bad}");
        }
        assert_eq!(retry_after(&HeaderMap::new(), now), None);
        assert_eq!(
            parse_http_date("Thu, 01 Jan 1970 00:00:00 GMT"),
            Some(UNIX_EPOCH)
        );
        assert_eq!(
            parse_http_date("Tue, 29 Feb 2028 12:00:00 GMT"),
            Some(UNIX_EPOCH + Duration::from_secs(1_835_438_400))
        );
    }

    #[test]
    fn backoff_grows_with_jitter_and_caps() {
        let p = Policy {
            attempts: 6,
            base: Duration::from_millis(100),
            max_delay: Duration::from_millis(700),
            max_retry_after: Duration::from_secs(5),
        };
        for _ in 0..50 {
            let d1 = p.delay(1, None);
            assert!(
                d1 >= Duration::from_millis(50) && d1 <= Duration::from_millis(100),
                "{d1:?}"
            );
            let d3 = p.delay(3, None);
            assert!(
                d3 >= Duration::from_millis(200) && d3 <= Duration::from_millis(400),
                "{d3:?}"
            );
            assert!(p.delay(30, None) <= Duration::from_millis(700));
        }
        assert_eq!(
            p.delay(1, Some(Duration::from_secs(2))),
            Duration::from_secs(2)
        );
        assert_eq!(
            p.delay(1, Some(Duration::from_secs(3600))),
            Duration::from_secs(5)
        );
    }

    #[test]
    fn statuses() {
        for s in [408, 429, 500, 502, 503, 504] {
            assert!(retryable_status(StatusCode::from_u16(s).unwrap()), "{s}");
        }
        for s in [200, 400, 401, 403, 404, 416, 501, 505] {
            assert!(!retryable_status(StatusCode::from_u16(s).unwrap()), "{s}");
        }
    }
}
