//! A strict reader of the Prometheus text exposition format 0.0.4: what the tests use to check
//! that `/metrics` is valid, and to read values back. Stricter than Prometheus itself where the
//! format leaves room for mistakes: metadata must precede its samples, a family's lines must be
//! contiguous, a series must not repeat, histogram buckets must be cumulative and end in `+Inf`.

use std::collections::{BTreeMap, HashMap, HashSet};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct ParseError {
    pub line: usize,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ParsedSample {
    /// The sample's name, with a histogram suffix if any.
    pub name: String,
    /// The family the sample belongs to.
    pub family: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct ParsedFamily {
    pub kind: Option<String>,
    pub help: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Parsed {
    pub families: BTreeMap<String, ParsedFamily>,
    pub samples: Vec<ParsedSample>,
}

impl Parsed {
    /// Samples named `name` whose labels include every pair of `labels`.
    pub fn find<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a ParsedSample> + 'a {
        self.samples.iter().filter(move |s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
    }

    /// The value of the only sample named `name` matching `labels`; `None` when there is none,
    /// panics never: several matches also give `None`.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut found = self.find(name, labels);
        let first = found.next()?;
        found.next().is_none().then_some(first.value)
    }
}

fn valid_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn valid_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !name.starts_with("__")
}

fn parse_value(text: &str) -> Option<f64> {
    match text {
        "NaN" => Some(f64::NAN),
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        _ => {
            // Rust's parser accepts "inf"/"nan" spellings that Prometheus does not.
            if text
                .chars()
                .any(|c| c.is_ascii_alphabetic() && c != 'e' && c != 'E')
            {
                return None;
            }
            text.parse().ok()
        }
    }
}

/// Splits a sample line into name, labels and the rest.
fn split_sample(line: &str) -> Result<(&str, BTreeMap<String, String>, &str), String> {
    let name_end = line.find(['{', ' ']).ok_or("a sample needs a value")?;
    let name = &line[..name_end];
    if !valid_metric_name(name) {
        return Err(format!("invalid metric name {name:?}"));
    }
    let mut labels = BTreeMap::new();
    let mut rest = &line[name_end..];
    if let Some(inner) = rest.strip_prefix('{') {
        let mut chars = inner.char_indices().peekable();
        let end = loop {
            // Label name up to '=' (or the closing brace).
            let Some(&(start, c)) = chars.peek() else {
                return Err("unterminated label set".to_string());
            };
            if c == '}' {
                break start + 1;
            }
            let mut eq = None;
            for (i, c) in chars.by_ref() {
                if c == '=' {
                    eq = Some(i);
                    break;
                }
            }
            let eq = eq.ok_or("a label needs `=`")?;
            let label = &inner[start..eq];
            if !valid_label_name(label) {
                return Err(format!("invalid label name {label:?}"));
            }
            if chars.next().map(|(_, c)| c) != Some('"') {
                return Err(format!("the value of label {label} must be quoted"));
            }
            let mut value = String::new();
            let mut closed = false;
            while let Some((_, c)) = chars.next() {
                match c {
                    '\\' => match chars.next().map(|(_, c)| c) {
                        Some('\\') => value.push('\\'),
                        Some('"') => value.push('"'),
                        Some('n') => value.push('\n'),
                        other => {
                            return Err(format!("invalid escape \\{other:?} in label {label}"));
                        }
                    },
                    '"' => {
                        closed = true;
                        break;
                    }
                    '\n' => return Err("line feed in a label value".to_string()),
                    c => value.push(c),
                }
            }
            if !closed {
                return Err(format!("unterminated value of label {label}"));
            }
            if labels.insert(label.to_string(), value).is_some() {
                return Err(format!("label {label} repeated"));
            }
            match chars.next() {
                Some((_, ',')) => {}
                Some((i, '}')) => break i + 1,
                other => {
                    return Err(format!(
                        "expected `,` or `}}` after a label, found {other:?}"
                    ));
                }
            }
        };
        rest = &inner[end..];
    }
    let rest = rest
        .strip_prefix(' ')
        .ok_or("expected a space before the value")?;
    Ok((name, labels, rest))
}

/// Parses and validates a whole exposition.
pub fn parse(text: &str) -> Result<Parsed, ParseError> {
    if !text.is_empty() && !text.ends_with('\n') {
        return Err(ParseError {
            line: text.lines().count(),
            message: "the exposition must end with a line feed".to_string(),
        });
    }
    let mut parsed = Parsed::default();
    let mut current: Option<String> = None;
    let mut closed: HashSet<String> = HashSet::new();
    let mut with_samples: HashSet<String> = HashSet::new();
    let mut series: HashSet<(String, BTreeMap<String, String>)> = HashSet::new();
    for (index, line) in text.lines().enumerate() {
        let number = index + 1;
        let fail = |message: String| ParseError {
            line: number,
            message,
        };
        if line.trim().is_empty() {
            continue;
        }
        // Switching to another family closes the current one: it must not come back.
        let mut enter = |family: &str| -> Result<(), ParseError> {
            if current.as_deref() != Some(family) {
                if closed.contains(family) {
                    return Err(fail(format!("lines of {family} are not contiguous")));
                }
                if let Some(previous) = current.replace(family.to_string()) {
                    closed.insert(previous);
                }
            }
            Ok(())
        };
        if let Some(comment) = line.strip_prefix('#') {
            let mut words = comment.trim_start().splitn(3, ' ');
            let keyword = words.next().unwrap_or_default();
            if keyword != "HELP" && keyword != "TYPE" {
                continue;
            }
            let name = words.next().unwrap_or_default();
            if !valid_metric_name(name) {
                return Err(fail(format!("invalid metric name {name:?} in {keyword}")));
            }
            let argument = words.next().unwrap_or_default();
            enter(name)?;
            if with_samples.contains(name) {
                return Err(fail(format!("{keyword} of {name} after its samples")));
            }
            let family = parsed.families.entry(name.to_string()).or_default();
            if keyword == "HELP" {
                if family.help.is_some() {
                    return Err(fail(format!("second HELP for {name}")));
                }
                let mut help = String::new();
                let mut chars = argument.chars();
                while let Some(c) = chars.next() {
                    match (c, c == '\\') {
                        (_, true) => match chars.next() {
                            Some('\\') => help.push('\\'),
                            Some('n') => help.push('\n'),
                            other => {
                                return Err(fail(format!("invalid escape \\{other:?} in HELP")));
                            }
                        },
                        (c, false) => help.push(c),
                    }
                }
                family.help = Some(help);
            } else {
                if family.kind.is_some() {
                    return Err(fail(format!("second TYPE for {name}")));
                }
                if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&argument) {
                    return Err(fail(format!("unknown type {argument:?} for {name}")));
                }
                family.kind = Some(argument.to_string());
            }
            continue;
        }
        let (name, labels, rest) = split_sample(line).map_err(fail)?;
        let mut parts = rest.split(' ');
        let value_text = parts.next().unwrap_or_default();
        let value =
            parse_value(value_text).ok_or_else(|| fail(format!("invalid value {value_text:?}")))?;
        if let Some(timestamp) = parts.next()
            && timestamp.parse::<i64>().is_err()
        {
            return Err(fail(format!("invalid timestamp {timestamp:?}")));
        }
        if parts.next().is_some() {
            return Err(fail("unexpected text after the timestamp".to_string()));
        }
        // A suffixed name belongs to the histogram or summary it extends.
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| {
                let base = name.strip_suffix(suffix)?;
                let kind = parsed.families.get(base)?.kind.as_deref()?;
                let fits = kind == "histogram" || (kind == "summary" && *suffix != "_bucket");
                fits.then(|| base.to_string())
            })
            .unwrap_or_else(|| name.to_string());
        enter(&family)?;
        with_samples.insert(family.clone());
        let kind = parsed
            .families
            .get(&family)
            .and_then(|f| f.kind.clone())
            .unwrap_or_default();
        // NaN is no valid counter value either.
        if kind == "counter" && (value.is_nan() || value < 0.0) {
            return Err(fail(format!("counter {name} has value {value}")));
        }
        if kind == "histogram" && name.ends_with("_bucket") {
            let le = labels
                .get("le")
                .ok_or_else(|| fail(format!("{name} without an `le` label")))?;
            parse_value(le).ok_or_else(|| fail(format!("invalid le {le:?}")))?;
        }
        if !series.insert((name.to_string(), labels.clone())) {
            return Err(fail(format!("series {name}{labels:?} repeated")));
        }
        parsed.samples.push(ParsedSample {
            name: name.to_string(),
            family,
            labels,
            value,
        });
    }
    check_histograms(&parsed)?;
    Ok(parsed)
}

/// Every histogram series: buckets cumulative, a `+Inf` bucket equal to `_count`, and a `_sum`.
fn check_histograms(parsed: &Parsed) -> Result<(), ParseError> {
    let fail = |message: String| ParseError { line: 0, message };
    for (family, meta) in &parsed.families {
        if meta.kind.as_deref() != Some("histogram") {
            continue;
        }
        let bucket = format!("{family}_bucket");
        let mut groups: HashMap<BTreeMap<String, String>, Vec<(f64, f64)>> = HashMap::new();
        for sample in parsed.samples.iter().filter(|s| s.name == bucket) {
            let mut key = sample.labels.clone();
            let le = key
                .remove("le")
                .and_then(|le| parse_value(&le))
                .unwrap_or(f64::NAN);
            groups.entry(key).or_default().push((le, sample.value));
        }
        for (labels, mut buckets) in groups {
            buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
            if buckets.windows(2).any(|w| w[1].1 < w[0].1) {
                return Err(fail(format!("{family}{labels:?}: buckets not cumulative")));
            }
            let Some(&(last, total)) = buckets.last() else {
                continue;
            };
            if last != f64::INFINITY {
                return Err(fail(format!("{family}{labels:?}: no +Inf bucket")));
            }
            let pairs: Vec<(&str, &str)> = labels
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            let count = parsed.value(&format!("{family}_count"), &pairs);
            if count != Some(total) {
                return Err(fail(format!(
                    "{family}{labels:?}: _count {count:?} differs from the +Inf bucket {total}"
                )));
            }
            if parsed.value(&format!("{family}_sum"), &pairs).is_none() {
                return Err(fail(format!("{family}{labels:?}: no _sum")));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_a_valid_exposition() {
        let text = "# HELP a_total Things.\n# TYPE a_total counter\na_total{x=\"1\",y=\"q\\\"\"} 2 1700000000000\n\
                    # TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_sum 3.5\nh_count 2\n\
                    # a free comment\ng NaN\n";
        let parsed = parse(text).expect("valid");
        assert_eq!(parsed.value("a_total", &[("x", "1")]), Some(2.0));
        assert_eq!(parsed.samples[0].labels["y"], "q\"");
        assert_eq!(parsed.families["h"].kind.as_deref(), Some("histogram"));
        assert!(parsed.value("g", &[]).is_some_and(f64::is_nan));
    }

    #[test]
    fn rejects_what_prometheus_would_reject_or_misread() {
        for (text, what) in [
            ("a 1", "no final line feed"),
            ("1a 1\n", "bad metric name"),
            ("a{__x=\"1\"} 1\n", "reserved label name"),
            ("a{x=1} 1\n", "unquoted label value"),
            ("a{x=\"1\\t\"} 1\n", "bad escape"),
            ("a{x=\"1\",x=\"2\"} 1\n", "repeated label"),
            ("a{x=\"1\" 1\n", "unterminated labels"),
            ("a one\n", "bad value"),
            ("a inf\n", "Rust-only spelling"),
            ("a 1 2 3\n", "trailing text"),
            ("a 1\na 2\n", "repeated series"),
            ("a 1\nb 1\na{x=\"1\"} 1\n", "non-contiguous family"),
            ("a 1\n# TYPE a gauge\n", "TYPE after samples"),
            ("# TYPE a gauge\n# TYPE a gauge\n", "second TYPE"),
            ("# TYPE a thing\n", "unknown type"),
            ("# TYPE c_total counter\nc_total -1\n", "negative counter"),
            ("# TYPE h histogram\nh_bucket 1\n", "bucket without le"),
            (
                "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_sum 1\nh_count 1\n",
                "buckets not cumulative",
            ),
            (
                "# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_sum 1\nh_count 1\n",
                "no +Inf bucket",
            ),
            (
                "# TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_sum 1\nh_count 1\n",
                "count differs",
            ),
        ] {
            assert!(parse(text).is_err(), "{what}: {text:?} was accepted");
        }
    }
}
