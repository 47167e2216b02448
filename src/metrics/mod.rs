//! Prometheus text exposition (format 0.0.4) for `/metrics` of the operator and of local mode.
//!
//! Pure: families are built from snapshots (status documents, counters) and rendered to text; no
//! global registry. [`names`] lists every metric pgrs exports, so that the chart's alert rules and
//! dashboard can be checked against it; [`parse`] is a strict reader of the format, used by the
//! tests to validate what is served.

pub mod local;
pub mod names;
pub mod operator;
pub mod parse;

use std::fmt::Write as _;
use std::time::Duration;

/// `Content-Type` of the text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// Label pairs of one sample, in the order they are rendered.
pub type Labels = Vec<(&'static str, String)>;

#[derive(Debug, Clone, PartialEq)]
struct Sample {
    /// `""`, or `_bucket`/`_sum`/`_count` for histograms.
    suffix: &'static str,
    labels: Labels,
    value: f64,
}

/// One metric family: a name, its help text and type, and its samples.
#[derive(Debug, Clone, PartialEq)]
pub struct Family {
    name: &'static str,
    help: &'static str,
    kind: Kind,
    samples: Vec<Sample>,
}

impl Family {
    pub fn new(name: &'static str, kind: Kind, help: &'static str) -> Self {
        Family {
            name,
            help,
            kind,
            samples: Vec::new(),
        }
    }

    /// Adds a counter or gauge sample.
    pub fn sample(&mut self, labels: Labels, value: f64) -> &mut Self {
        self.samples.push(Sample {
            suffix: "",
            labels,
            value,
        });
        self
    }

    /// Adds the `_bucket`, `_sum` and `_count` samples of one histogram series.
    pub fn histogram(&mut self, labels: Labels, histogram: &Histogram) -> &mut Self {
        let mut cumulative = 0;
        for (bound, count) in histogram.bounds.iter().zip(&histogram.counts) {
            cumulative += count;
            let mut with_le = labels.clone();
            with_le.push(("le", format_value(*bound)));
            self.samples.push(Sample {
                suffix: "_bucket",
                labels: with_le,
                value: cumulative as f64,
            });
        }
        let mut with_le = labels.clone();
        with_le.push(("le", "+Inf".to_string()));
        self.samples.push(Sample {
            suffix: "_bucket",
            labels: with_le,
            value: histogram.count as f64,
        });
        self.samples.push(Sample {
            suffix: "_sum",
            labels: labels.clone(),
            value: histogram.sum,
        });
        self.samples.push(Sample {
            suffix: "_count",
            labels,
            value: histogram.count as f64,
        });
        self
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }
}

/// A set of families rendered together; a family name must appear once.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Exposition {
    families: Vec<Family>,
}

impl Exposition {
    pub fn new() -> Self {
        Exposition::default()
    }

    /// The family `name`, created on first use (later calls return the same family).
    pub fn family(&mut self, name: &'static str, kind: Kind, help: &'static str) -> &mut Family {
        let index = match self.families.iter().position(|f| f.name == name) {
            Some(index) => index,
            None => {
                self.families.push(Family::new(name, kind, help));
                self.families.len() - 1
            }
        };
        &mut self.families[index]
    }

    pub fn render(&self) -> String {
        let mut text = String::new();
        for family in &self.families {
            render_family(&mut text, family);
        }
        text
    }
}

fn render_family(text: &mut String, family: &Family) {
    // HELP and TYPE even without samples: scrapers learn the family exists.
    let _ = writeln!(text, "# HELP {} {}", family.name, escape_help(family.help));
    let _ = writeln!(text, "# TYPE {} {}", family.name, family.kind.as_str());
    for sample in &family.samples {
        text.push_str(family.name);
        text.push_str(sample.suffix);
        if !sample.labels.is_empty() {
            text.push('{');
            for (i, (name, value)) in sample.labels.iter().enumerate() {
                if i > 0 {
                    text.push(',');
                }
                let _ = write!(text, "{name}=\"{}\"", escape_label_value(value));
            }
            text.push('}');
        }
        let _ = writeln!(text, " {}", format_value(sample.value));
    }
}

/// HELP text escaping: backslash and line feed.
pub fn escape_help(text: &str) -> String {
    text.replace('\\', "\\\\").replace('\n', "\\n")
}

/// Label value escaping: backslash, double quote and line feed.
pub fn escape_label_value(text: &str) -> String {
    text.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Go-style float text: integers without a fraction, `+Inf`, `-Inf`, `NaN`.
pub fn format_value(value: f64) -> String {
    if value.is_nan() {
        "NaN".to_string()
    } else if value.is_infinite() {
        if value > 0.0 { "+Inf" } else { "-Inf" }.to_string()
    } else {
        // `{}` of an f64 prints the shortest text that reads back to the same value.
        format!("{value}")
    }
}

/// A cumulative histogram with fixed upper bounds (seconds).
#[derive(Debug, Clone, PartialEq)]
pub struct Histogram {
    bounds: Vec<f64>,
    /// Per bucket (not cumulative); observations above the last bound only count in `count`.
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

/// Bounds for reconcile and controller-round durations: a round is milliseconds when the agents
/// answer and seconds when some time out.
pub const DURATION_BOUNDS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

impl Histogram {
    pub fn new(bounds: &[f64]) -> Self {
        Histogram {
            bounds: bounds.to_vec(),
            counts: vec![0; bounds.len()],
            sum: 0.0,
            count: 0,
        }
    }

    pub fn observe(&mut self, value: f64) {
        if let Some(index) = self.bounds.iter().position(|b| value <= *b) {
            self.counts[index] += 1;
        }
        self.sum += value;
        self.count += 1;
    }

    pub fn observe_duration(&mut self, took: Duration) {
        self.observe(took.as_secs_f64());
    }

    pub fn count(&self) -> u64 {
        self.count
    }
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram::new(DURATION_BOUNDS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_help_type_and_escaped_labels() {
        let mut exposition = Exposition::new();
        exposition
            .family(
                "pgrs_test_total",
                Kind::Counter,
                "A help text with a \\ and\na new line.",
            )
            .sample(vec![("instance", "a\"b\\c\nd".to_string())], 3.0);
        exposition.family("pgrs_empty", Kind::Gauge, "Nothing yet.");
        let text = exposition.render();
        assert_eq!(
            text,
            "# HELP pgrs_test_total A help text with a \\\\ and\\na new line.\n\
             # TYPE pgrs_test_total counter\n\
             pgrs_test_total{instance=\"a\\\"b\\\\c\\nd\"} 3\n\
             # HELP pgrs_empty Nothing yet.\n\
             # TYPE pgrs_empty gauge\n"
        );
        let parsed = parse::parse(&text).expect("valid exposition");
        assert_eq!(parsed.samples[0].labels["instance"], "a\"b\\c\nd");
    }

    #[test]
    fn same_family_is_rendered_once() {
        let mut exposition = Exposition::new();
        exposition
            .family("pgrs_g", Kind::Gauge, "g")
            .sample(vec![("a", "1".into())], 1.0);
        exposition
            .family("pgrs_g", Kind::Gauge, "g")
            .sample(vec![("a", "2".into())], 2.5);
        let text = exposition.render();
        assert_eq!(text.matches("# TYPE pgrs_g gauge").count(), 1, "{text}");
        assert!(text.contains("pgrs_g{a=\"2\"} 2.5\n"), "{text}");
        parse::parse(&text).expect("valid exposition");
    }

    #[test]
    fn histogram_buckets_are_cumulative() {
        let mut histogram = Histogram::new(&[0.1, 1.0]);
        histogram.observe(0.05);
        histogram.observe(0.5);
        histogram.observe(0.7);
        histogram.observe(4.0);
        let mut exposition = Exposition::new();
        exposition
            .family("pgrs_round_seconds", Kind::Histogram, "Round duration.")
            .histogram(vec![("cluster", "c".into())], &histogram);
        let text = exposition.render();
        for line in [
            "pgrs_round_seconds_bucket{cluster=\"c\",le=\"0.1\"} 1\n",
            "pgrs_round_seconds_bucket{cluster=\"c\",le=\"1\"} 3\n",
            "pgrs_round_seconds_bucket{cluster=\"c\",le=\"+Inf\"} 4\n",
            "pgrs_round_seconds_sum{cluster=\"c\"} 5.25\n",
            "pgrs_round_seconds_count{cluster=\"c\"} 4\n",
        ] {
            assert!(text.contains(line), "{line} missing from {text}");
        }
        parse::parse(&text).expect("valid exposition");
    }

    #[test]
    fn values_use_prometheus_spelling() {
        assert_eq!(format_value(f64::INFINITY), "+Inf");
        assert_eq!(format_value(f64::NEG_INFINITY), "-Inf");
        assert_eq!(format_value(f64::NAN), "NaN");
        assert_eq!(format_value(12.0), "12");
        assert_eq!(format_value(0.25), "0.25");
    }
}
