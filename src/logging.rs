//! The log the command writes, for programs that embed the primary: it
//! logs through `tracing`, so without a subscriber it says nothing.
//! [`init_logging`] installs the command's own: one line per event on
//! stderr, `RUST_LOG` for the level (info by default), the message alone
//! in text (the values it names are in it), every field in JSON.

#[cfg(feature = "logging")]
use std::io::IsTerminal;

/// How log lines look.
#[cfg(feature = "logging")]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum LogFormat {
    /// `2026-12-07T08:39:06.007456Z  INFO worker 1 started (pid 15754)`.
    #[default]
    Text,
    /// One JSON object per line, with the structured fields (`worker`,
    /// `pid`, ...), for log shippers.
    Json,
}

/// Installs the command's log subscriber for this process: `RUST_LOG` sets
/// the level (else `default_level`, e.g. `"info"`), lines go to stderr in
/// `format`. Does nothing if a subscriber is already installed.
///
/// ```no_run
/// distributor::init_logging("info", distributor::LogFormat::Text);
/// ```
#[cfg(feature = "logging")]
pub fn init_logging(default_level: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    let _ = match format {
        LogFormat::Json => fmt.json().try_init(),
        LogFormat::Text => {
            // Text lines say each thing once: the message already holds
            // what the structured fields repeat for JSON.
            let message_only = tracing_subscriber::fmt::format::debug_fn(|w, field, value| {
                if field.name() == "message" {
                    write!(w, "{value:?}")
                } else {
                    Ok(())
                }
            });
            fmt.fmt_fields(message_only)
                .with_ansi(std::io::stderr().is_terminal())
                .try_init()
        }
    };
}

/// `n` and `noun`, plural unless `n` is 1: "1 worker", "3 workers".
pub(crate) fn count(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}
