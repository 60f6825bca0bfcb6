//! A strict little reader of the Prometheus text format (0.0.4), for
//! checking what `GET /metrics` serves: every sample must follow the
//! `# HELP` and `# TYPE` lines of its family.

use std::collections::BTreeMap;

/// One sample: `name{labels} value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A parsed exposition.
#[derive(Debug, Clone)]
pub struct Scrape {
    pub text: String,
    pub samples: Vec<Sample>,
    /// Family name to its type (`counter`, `gauge`), from `# TYPE`.
    pub types: BTreeMap<String, String>,
    /// Family name to its help text, from `# HELP`.
    pub help: BTreeMap<String, String>,
}

impl Scrape {
    /// Parses `text`; panics, quoting the line, on anything malformed.
    pub fn parse(text: &str) -> Scrape {
        let mut scrape = Scrape {
            text: text.to_string(),
            samples: Vec::new(),
            types: BTreeMap::new(),
            help: BTreeMap::new(),
        };
        assert!(text.ends_with('\n'), "no final newline:\n{text}");
        let mut family: Option<String> = None;
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
                assert!(
                    scrape.help.insert(name.into(), help.into()).is_none(),
                    "second HELP for {name}:\n{text}"
                );
                family = Some(name.to_string());
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
                assert_eq!(family.as_deref(), Some(name), "TYPE without HELP: {line}");
                assert!(
                    ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                    "{line}"
                );
                scrape.types.insert(name.into(), kind.into());
            } else if line.starts_with('#') || line.is_empty() {
                continue;
            } else {
                let sample = parse_sample(line);
                let family = family.as_deref().expect("a sample before any HELP");
                assert_eq!(sample.name, family, "sample outside its family: {line}");
                assert!(scrape.types.contains_key(family), "no TYPE for {line}");
                scrape.samples.push(sample);
            }
        }
        scrape
    }

    /// Every sample named `name`.
    pub fn all(&self, name: &str) -> Vec<&Sample> {
        self.samples.iter().filter(|s| s.name == name).collect()
    }

    /// The value of the one sample named `name` whose labels include
    /// `labels`; `None` if there is none, panics if there are several.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let found: Vec<&Sample> = self
            .all(name)
            .into_iter()
            .filter(|s| {
                labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .collect();
        assert!(found.len() <= 1, "several {name}{labels:?}: {found:?}");
        found.first().map(|s| s.value)
    }
}

fn parse_sample(line: &str) -> Sample {
    let bad = || -> ! { panic!("malformed sample line {line:?}") };
    let name_end = line.find(['{', ' ']).unwrap_or_else(|| bad());
    let name = &line[..name_end];
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    {
        bad();
    }
    let mut labels = BTreeMap::new();
    let mut rest = &line[name_end..];
    if let Some(inner) = rest.strip_prefix('{') {
        let mut chars = inner.char_indices();
        let mut key = String::new();
        loop {
            let (i, c) = chars.next().unwrap_or_else(|| bad());
            match c {
                // `{}`, or a trailing comma.
                '}' if key.is_empty() => {
                    rest = &inner[i + 1..];
                    break;
                }
                '=' => {
                    if chars.next().map(|(_, c)| c) != Some('"') {
                        bad();
                    }
                    let mut value = String::new();
                    loop {
                        match chars.next().unwrap_or_else(|| bad()).1 {
                            '\\' => match chars.next().unwrap_or_else(|| bad()).1 {
                                '\\' => value.push('\\'),
                                '"' => value.push('"'),
                                'n' => value.push('\n'),
                                _ => bad(),
                            },
                            '"' => break,
                            c => value.push(c),
                        }
                    }
                    if labels.insert(std::mem::take(&mut key), value).is_some() {
                        bad();
                    }
                    match chars.next().unwrap_or_else(|| bad()) {
                        (_, ',') => {}
                        (i, '}') => {
                            rest = &inner[i + 1..];
                            break;
                        }
                        _ => bad(),
                    }
                }
                c if c.is_ascii_alphanumeric() || c == '_' => key.push(c),
                _ => bad(),
            }
        }
    }
    let value = rest
        .strip_prefix(' ')
        .and_then(|v| v.trim_end().parse::<f64>().ok())
        .unwrap_or_else(|| bad());
    Sample {
        name: name.to_string(),
        labels,
        value,
    }
}

/// Calls `scrape` until `cond` holds on what it returns (bounded by
/// [`super::DEADLINE`]); returns the last scrape. Panics naming `what`,
/// with the last scrape and `log` (the primary's log, for the message).
pub fn scrape_until(
    what: &str,
    mut scrape: impl FnMut() -> Scrape,
    cond: impl Fn(&Scrape) -> bool,
    log: impl Fn() -> String,
) -> Scrape {
    let mut last = None;
    let ok = super::poll_until(super::DEADLINE, || {
        let s = scrape();
        let done = cond(&s);
        last = Some(s);
        done
    });
    let last = last.expect("scraped at least once");
    assert!(
        ok,
        "never {what}; last scrape:\n{}\nlog:\n{}",
        last.text,
        log()
    );
    last
}
