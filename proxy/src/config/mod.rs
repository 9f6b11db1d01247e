//! Command line and [`Config`]: parsed and validated in one place.
//!
//! Every validation error names the setting, the value that was given and what to do
//! about it, so an operator can fix a unit file or a pod spec without reading code.
//!
//! | file | what |
//! |---|---|
//! | `settings.rs` | [`Config`], the validated settings, their defaults and `GET /config` |
//! | `cli.rs` | [`Cli`], the command line as clap parses it (text, not yet validated) |
//! | `validate.rs` | [`Config::from_cli`]: every setting checked, alone and against the others |
//! | `parse.rs` | the value parsers (addresses, durations, marks, switches, ...) |
//! | `error.rs` | [`ConfigError`]: setting, value, problem, what to do |

mod cli;
mod error;
mod parse;
mod settings;
mod validate;

pub use cli::Cli;
pub use error::ConfigError;
pub use parse::{parse_duration, parse_mark, parse_switch};
pub use settings::{
    Config, LogFormat, DEFAULT_ADMIN, DEFAULT_BYPASS_MARK, DEFAULT_INBOUND_SOURCE,
    DEFAULT_INBOUND_SOURCE6, DEFAULT_OUTBOUND,
};
pub use validate::CliError;
