//! Prometheus metrics, written by hand in the text exposition format: request counts and
//! latency histograms by route, method and status; index generation, size and reloads.
//!
//! A whole metrics crate would buy little here: a handful of series behind one mutex, taken
//! once per request for a few hundred nanoseconds.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds (seconds) of the latency histogram buckets.
pub const BUCKETS: [f64; 14] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

#[derive(Debug, Default, Clone)]
struct Histogram {
    /// Per bucket (not cumulative); the last slot is +Inf.
    counts: [u64; BUCKETS.len() + 1],
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, secs: f64) {
        let i = BUCKETS.iter().position(|&b| secs <= b).unwrap_or(BUCKETS.len());
        self.counts[i] += 1;
        self.sum += secs;
        self.count += 1;
    }
}

/// (route, method, status)
type Key = (String, String, u16);

#[derive(Debug, Default)]
struct Inner {
    requests: BTreeMap<Key, Histogram>,
    reloads: BTreeMap<&'static str, u64>,
    generation: Option<(u64, usize)>,
}

/// The server's metrics.
#[derive(Debug, Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

impl Metrics {
    /// Counts one finished request. `route` is the matched route template (`/v1/items/{id}`),
    /// never the raw path, so the series stay few.
    pub fn observe(&self, route: &str, method: &str, status: u16, took: Duration) {
        let mut m = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        m.requests.entry((route.to_string(), method.to_string(), status)).or_default().observe(took.as_secs_f64());
    }

    /// Counts a reload attempt: `switched`, `unchanged` or `refused`.
    pub fn reload(&self, outcome: &'static str) {
        *self.inner.lock().unwrap_or_else(|e| e.into_inner()).reloads.entry(outcome).or_default() += 1;
    }

    /// Records the live generation's number and item count.
    pub fn set_generation(&self, generation: u64, items: usize) {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).generation = Some((generation, items));
    }

    /// The text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
        let m = self.inner.lock().unwrap_or_else(|e| e.into_inner()).clone_view();
        let mut out = String::new();
        let w = &mut out;
        let _ = writeln!(w, "# HELP hiercon_http_requests_total HTTP requests answered, by route, method and status.");
        let _ = writeln!(w, "# TYPE hiercon_http_requests_total counter");
        for ((route, method, status), h) in &m.requests {
            let _ = writeln!(
                w,
                "hiercon_http_requests_total{{route=\"{}\",method=\"{}\",status=\"{status}\"}} {}",
                escape(route),
                escape(method),
                h.count
            );
        }
        let _ = writeln!(w, "# HELP hiercon_http_request_duration_seconds Time to answer a request.");
        let _ = writeln!(w, "# TYPE hiercon_http_request_duration_seconds histogram");
        for ((route, method, status), h) in &m.requests {
            let labels = format!("route=\"{}\",method=\"{}\",status=\"{status}\"", escape(route), escape(method));
            let mut cumulative = 0;
            for (i, le) in BUCKETS.iter().enumerate() {
                cumulative += h.counts[i];
                let _ =
                    writeln!(w, "hiercon_http_request_duration_seconds_bucket{{{labels},le=\"{le}\"}} {cumulative}");
            }
            let _ = writeln!(w, "hiercon_http_request_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {}", h.count);
            let _ = writeln!(w, "hiercon_http_request_duration_seconds_sum{{{labels}}} {}", h.sum);
            let _ = writeln!(w, "hiercon_http_request_duration_seconds_count{{{labels}}} {}", h.count);
        }
        let _ = writeln!(w, "# HELP hiercon_index_generation The live index generation (n of gen-<n>; 0 = none).");
        let _ = writeln!(w, "# TYPE hiercon_index_generation gauge");
        let _ = writeln!(w, "hiercon_index_generation {}", m.generation.map_or(0, |g| g.0));
        let _ = writeln!(w, "# HELP hiercon_index_items Items in the live index generation.");
        let _ = writeln!(w, "# TYPE hiercon_index_items gauge");
        let _ = writeln!(w, "hiercon_index_items {}", m.generation.map_or(0, |g| g.1));
        let _ = writeln!(w, "# HELP hiercon_index_reloads_total Reload attempts by outcome.");
        let _ = writeln!(w, "# TYPE hiercon_index_reloads_total counter");
        for outcome in ["switched", "unchanged", "refused"] {
            let n = m.reloads.get(outcome).copied().unwrap_or(0);
            let _ = writeln!(w, "hiercon_index_reloads_total{{outcome=\"{outcome}\"}} {n}");
        }
        out
    }
}

impl Inner {
    fn clone_view(&self) -> Inner {
        Inner { requests: self.requests.clone(), reloads: self.reloads.clone(), generation: self.generation }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of the sample line starting with `prefix` (labels included).
    fn sample(text: &str, prefix: &str) -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .unwrap_or_else(|| panic!("{prefix} in\n{text}"))
            .trim()
            .parse()
            .unwrap()
    }

    #[test]
    fn histograms_are_cumulative_and_count_every_observation() {
        let m = Metrics::default();
        let ms = |v: u64| Duration::from_micros(v * 1000);
        for t in [ms(0), ms(3), ms(3), ms(20), ms(20_000)] {
            m.observe("/v1/search", "POST", 200, t);
        }
        m.observe("/v1/search", "POST", 400, ms(1));
        m.set_generation(7, 120);
        m.reload("refused");
        let text = m.render();
        let l = "route=\"/v1/search\",method=\"POST\",status=\"200\"";
        assert_eq!(sample(&text, &format!("hiercon_http_requests_total{{{l}}}")), 5.0);
        // Bucket counts are cumulative: 1 at 0.5 ms, 3 at 5 ms, 4 at 25 ms, 4 at 10 s, 5 at +Inf.
        let b = |le: &str| sample(&text, &format!("hiercon_http_request_duration_seconds_bucket{{{l},le=\"{le}\"}}"));
        assert_eq!([b("0.0005"), b("0.005"), b("0.025"), b("10"), b("+Inf")], [1.0, 3.0, 4.0, 4.0, 5.0]);
        let sum = sample(&text, &format!("hiercon_http_request_duration_seconds_sum{{{l}}}"));
        assert!((sum - 20.026).abs() < 1e-9, "{sum}");
        assert_eq!(sample(&text, "hiercon_index_generation"), 7.0);
        assert_eq!(sample(&text, "hiercon_index_items"), 120.0);
        assert_eq!(sample(&text, "hiercon_index_reloads_total{outcome=\"refused\"}"), 1.0);
        assert_eq!(sample(&text, "hiercon_index_reloads_total{outcome=\"switched\"}"), 0.0);
        // Every sample line is `name{labels} value` or `name value`.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let value = line.rsplit(' ').next().unwrap();
            assert!(value.parse::<f64>().is_ok(), "{line}");
        }
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
