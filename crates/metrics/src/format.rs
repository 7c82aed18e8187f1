//! The two exposition formats a scraper may ask for, and which one it asked for.
//!
//! `prometheus-client` writes OpenMetrics 1.0 only. Prometheus asks for OpenMetrics first,
//! but older Prometheus releases, Datadog, Telegraf and curl ask for (or accept only) the
//! Prometheus text format 0.0.4, whose parser refuses OpenMetrics' `info` type, `# UNIT`
//! and `# EOF`. So the OpenMetrics text is rewritten family by family:
//! - a counter family `x` with samples `x_total` is typed and described as `x_total`
//!   (0.0.4 names a family by its sample), and its `x_created` samples are dropped;
//! - an info family `x` with the sample `x_info` becomes the gauge `x_info`;
//! - `unknown` becomes `untyped`; `# UNIT` and `# EOF` go; exemplars are cut off;
//! - gauges, histograms and summaries are the same in both.

/// The OpenMetrics content type.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The Prometheus text format's content type.
pub const TEXT_0_0_4: &str = "text/plain; version=0.0.4; charset=utf-8";

/// An exposition format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// OpenMetrics 1.0 text.
    OpenMetrics,
    /// The Prometheus text format 0.0.4.
    Text,
}

impl Format {
    /// The format an `Accept` header asks for: OpenMetrics when it is acceptable and not
    /// ranked below the text format, the text format otherwise (also with no header, as
    /// curl sends `*/*`).
    pub fn negotiate(accept: Option<&str>) -> Self {
        let Some(accept) = accept else {
            return Format::Text;
        };
        let mut openmetrics = 0.0_f32;
        let mut text = 0.0_f32;
        for range in accept.split(',') {
            let mut parts = range.split(';').map(str::trim);
            let media = parts.next().unwrap_or_default().to_ascii_lowercase();
            let q = parts
                .filter_map(|p| p.split_once('='))
                .find(|(k, _)| k.trim().eq_ignore_ascii_case("q"))
                .and_then(|(_, v)| v.trim().parse::<f32>().ok())
                .unwrap_or(1.0);
            match media.as_str() {
                "application/openmetrics-text" => openmetrics = openmetrics.max(q),
                "text/plain" | "text/*" | "*/*" => text = text.max(q),
                _ => {}
            }
        }
        if openmetrics > 0.0 && openmetrics >= text {
            Format::OpenMetrics
        } else {
            Format::Text
        }
    }

    /// The content type of a response in this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => OPENMETRICS,
            Format::Text => TEXT_0_0_4,
        }
    }
}

/// OpenMetrics text rewritten in the Prometheus text format 0.0.4.
pub fn to_text_0_0_4(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    // A counter's `_created` samples are dropped; a HELP line waits for the TYPE line
    // after it, which decides the family's name in the text format.
    let mut created = String::new();
    let mut help: Option<(&str, &str)> = None;
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            flush_help(&mut out, help.take(), "", "");
            help = Some(rest.split_once(' ').unwrap_or((rest, "")));
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, t) = rest.split_once(' ').unwrap_or((rest, "unknown"));
            let (suffix, t) = match t {
                "counter" => ("_total", "counter"),
                "info" => ("_info", "gauge"),
                "gauge" | "histogram" | "summary" => ("", t),
                _ => ("", "untyped"),
            };
            created.clear();
            if t == "counter" {
                created.push_str(name);
                created.push_str("_created");
            }
            flush_help(&mut out, help.take(), name, suffix);
            for part in ["# TYPE ", name, suffix, " ", t, "\n"] {
                out.push_str(part);
            }
            continue;
        }
        flush_help(&mut out, help.take(), "", "");
        if line.starts_with('#') {
            // `# UNIT`, `# EOF`: OpenMetrics only.
            continue;
        }
        let sample = without_exemplar(line);
        if !created.is_empty() && sample_name(sample) == created {
            continue;
        }
        out.push_str(sample);
        out.push('\n');
    }
    flush_help(&mut out, help, "", "");
    out
}

/// Write a held HELP line, under `family` + `suffix` when the TYPE line after it named
/// that family.
fn flush_help(out: &mut String, help: Option<(&str, &str)>, family: &str, suffix: &str) {
    if let Some((name, text)) = help {
        let suffix = if name == family { suffix } else { "" };
        for part in ["# HELP ", name, suffix, " ", text, "\n"] {
            out.push_str(part);
        }
    }
}

/// A sample line without its exemplar (` # {...} value` after the sample's value). The
/// search starts after the label set, whose quoted values may hold ` # ` themselves.
fn without_exemplar(line: &str) -> &str {
    let mut labels_end = 0;
    if let Some(open) = line.find('{').filter(|&o| !line[..o].contains(' ')) {
        let (mut quoted, mut escaped) = (false, false);
        for (i, c) in line[open..].char_indices() {
            match c {
                _ if escaped => escaped = false,
                '\\' if quoted => escaped = true,
                '"' => quoted = !quoted,
                '}' if !quoted => {
                    labels_end = open + i;
                    break;
                }
                _ => {}
            }
        }
    }
    match line[labels_end..].find(" # ") {
        Some(at) => &line[..labels_end + at],
        None => line,
    }
}

/// The metric name of a sample line.
fn sample_name(sample: &str) -> &str {
    let end = sample.find(['{', ' ']).unwrap_or(sample.len());
    &sample[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_asks_for_openmetrics_and_gets_it() {
        // The Accept header Prometheus 2.x/3.x sends by default.
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(Format::negotiate(Some(prometheus)), Format::OpenMetrics);
        // Older scrapers, curl, no header at all.
        assert_eq!(
            Format::negotiate(Some("text/plain;version=0.0.4;q=1,*/*;q=0.1")),
            Format::Text
        );
        assert_eq!(Format::negotiate(Some("*/*")), Format::Text);
        assert_eq!(Format::negotiate(None), Format::Text);
        // Ranked below the text format, or refused with q=0.
        assert_eq!(
            Format::negotiate(Some("application/openmetrics-text;q=0.3,text/plain;q=0.9")),
            Format::Text
        );
        assert_eq!(
            Format::negotiate(Some("application/openmetrics-text;q=0")),
            Format::Text
        );
    }

    #[test]
    fn exemplars_go_but_label_values_keep_what_looks_like_one() {
        assert_eq!(
            to_text_0_0_4("a_bucket{le=\"1\"} 3 # {trace=\"x\"} 0.5 123\n"),
            "a_bucket{le=\"1\"} 3\n"
        );
        assert_eq!(to_text_0_0_4("a_total 3 # {t=\"x\"} 1\n"), "a_total 3\n");
        let odd = "a{path=\"/x # {y} \\\" # z\"} 1\n";
        assert_eq!(to_text_0_0_4(odd), odd);
    }

    #[test]
    fn families_are_renamed_the_way_the_text_format_names_them() {
        let om = "# HELP hybridlet_build Build information.\n# TYPE hybridlet_build info\nhybridlet_build_info{version=\"1\"} 1\n\
# HELP hybridlet_reloads Reloads.\n# TYPE hybridlet_reloads counter\nhybridlet_reloads_total{result=\"ok\"} 2\nhybridlet_reloads_created{result=\"ok\"} 1.7e9\n\
# HELP hybridlet_uptime_seconds Uptime.\n# TYPE hybridlet_uptime_seconds gauge\n# UNIT hybridlet_uptime_seconds seconds\nhybridlet_uptime_seconds 5\n\
# HELP hybridlet_d_seconds D.\n# TYPE hybridlet_d_seconds histogram\nhybridlet_d_seconds_bucket{le=\"+Inf\"} 1 # {trace=\"a\"} 0.1\nhybridlet_d_seconds_sum 0.1\nhybridlet_d_seconds_count 1\n# EOF\n";
        let text = to_text_0_0_4(om);
        assert_eq!(
            text,
            "# HELP hybridlet_build_info Build information.\n# TYPE hybridlet_build_info gauge\nhybridlet_build_info{version=\"1\"} 1\n\
# HELP hybridlet_reloads_total Reloads.\n# TYPE hybridlet_reloads_total counter\nhybridlet_reloads_total{result=\"ok\"} 2\n\
# HELP hybridlet_uptime_seconds Uptime.\n# TYPE hybridlet_uptime_seconds gauge\nhybridlet_uptime_seconds 5\n\
# HELP hybridlet_d_seconds D.\n# TYPE hybridlet_d_seconds histogram\nhybridlet_d_seconds_bucket{le=\"+Inf\"} 1\nhybridlet_d_seconds_sum 0.1\nhybridlet_d_seconds_count 1\n"
        );
    }
}
