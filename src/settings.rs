//! Where `serve`'s settings come from besides flags and environment variables: a TOML
//! file (`--config switchboard.toml`), below both, above the defaults. And how logs are
//! written: text, coloured only on a terminal, or JSON for log shippers.

use std::ffi::OsString;
use std::io::IsTerminal;

use anyhow::{bail, Context};
use clap::parser::ValueSource;
use clap::{ArgMatches, Command, ValueEnum};

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines; coloured only when stderr is a terminal and `NO_COLOR` is unset.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// Starts the log subscriber: `filter` in `RUST_LOG` syntax, to stderr.
pub fn init_logs(filter: &str, format: LogFormat) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(filter).context("parsing --log-level")?;
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => {
            let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
            logs.with_ansi(colour).init();
        }
        LogFormat::Json => logs.json().with_ansi(false).init(),
    }
    Ok(())
}

/// The arguments with the config file's settings added for every option that neither a
/// flag nor an environment variable set, so that the precedence is flag > env > file >
/// default. `command` is the whole CLI; the file is the one the subcommand's `--config`
/// (or its variable) names. A key is an option's long name, with `-` or `_`
/// (`max_concurrent_users = 500`); a key that names no option is an error, so a typo does
/// not pass for a setting.
pub fn with_config_file(command: Command, args: Vec<OsString>) -> anyhow::Result<Vec<OsString>> {
    // Arguments clap refuses (or `--help`) are left for the real parse to report.
    let Ok(matches) = command.clone().try_get_matches_from(args.clone()) else {
        return Ok(args);
    };
    let Some((name, given)) = matches.subcommand() else {
        return Ok(args);
    };
    let Ok(Some(path)) = given.try_get_one::<String>("config") else {
        return Ok(args);
    };
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    let file: toml::Table = toml::from_str(&text).with_context(|| format!("parsing {path}"))?;
    let options = command
        .find_subcommand(name)
        .expect("clap matched this subcommand")
        .clone();
    let mut added = Vec::new();
    for (key, value) in file {
        let id = key.replace('-', "_");
        let Some(long) = options
            .get_arguments()
            .find(|a| a.get_id() == id.as_str())
            .and_then(|a| a.get_long())
        else {
            bail!("{path}: `{key}` is not a setting of `switchboard {name}`");
        };
        if id == "config" || set_above_file(given, &id) {
            continue;
        }
        let long = OsString::from(format!("--{long}"));
        match value {
            toml::Value::Boolean(true) => added.push(long),
            toml::Value::Boolean(false) => {}
            toml::Value::String(s) => added.extend([long, s.into()]),
            toml::Value::Integer(n) => added.extend([long, n.to_string().into()]),
            toml::Value::Float(x) => added.extend([long, x.to_string().into()]),
            other => bail!(
                "{path}: `{key}` must be a string, a number or a boolean, not {}",
                other.type_str()
            ),
        }
    }
    Ok(args.into_iter().chain(added).collect())
}

/// Whether a flag or an environment variable gave `id`.
fn set_above_file(given: &ArgMatches, id: &str) -> bool {
    matches!(
        given.value_source(id),
        Some(ValueSource::CommandLine | ValueSource::EnvVariable)
    )
}

#[cfg(test)]
mod tests {
    use clap::{Arg, ArgAction};

    use super::*;

    fn cli() -> Command {
        let serve = Command::new("serve")
            .arg(Arg::new("config").long("config").env("T_CONFIG"))
            .arg(
                Arg::new("bind")
                    .long("bind")
                    .default_value("127.0.0.1:4000"),
            )
            .arg(
                Arg::new("max_events")
                    .long("max-events")
                    .env("T_MAX_EVENTS")
                    .default_value("100"),
            )
            .arg(
                Arg::new("private_only")
                    .long("private-only")
                    .action(ArgAction::SetTrue),
            );
        Command::new("switchboard").subcommand(serve)
    }

    fn resolved(args: &[&str], file: &str) -> anyhow::Result<ArgMatches> {
        let dir = std::env::temp_dir().join(format!("switchboard-settings-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{}.toml", file.len()));
        std::fs::write(&path, file).unwrap();
        let mut argv: Vec<OsString> = ["switchboard", "serve", "--config"]
            .iter()
            .map(OsString::from)
            .collect();
        argv.push(path.into_os_string());
        argv.extend(args.iter().map(OsString::from));
        let args = with_config_file(cli(), argv)?;
        let matches = cli().get_matches_from(args);
        Ok(matches.subcommand_matches("serve").unwrap().clone())
    }

    #[test]
    fn a_flag_beats_the_file_and_the_file_beats_the_default() {
        let file = "bind = \"0.0.0.0:9\"\nmax-events = 7\nprivate_only = true\n";
        let m = resolved(&[], file).unwrap();
        assert_eq!(m.get_one::<String>("bind").unwrap(), "0.0.0.0:9");
        assert_eq!(m.get_one::<String>("max_events").unwrap(), "7");
        assert!(m.get_flag("private_only"));
        let m = resolved(&["--bind", "127.0.0.1:1"], file).unwrap();
        assert_eq!(m.get_one::<String>("bind").unwrap(), "127.0.0.1:1");
        assert_eq!(m.get_one::<String>("max_events").unwrap(), "7");
    }

    #[test]
    fn unknown_keys_and_tables_are_refused_with_the_file_named() {
        let error = resolved(&[], "bnid = \"x\"").unwrap_err().to_string();
        assert!(error.contains("`bnid` is not a setting"), "{error}");
        let error = resolved(&[], "[bind]\nport = 1").unwrap_err().to_string();
        assert!(
            error.contains("must be a string, a number or a boolean"),
            "{error}"
        );
        let error = format!("{:#}", resolved(&[], "bind = ").unwrap_err());
        assert!(error.contains("parsing"), "{error}");
    }
}
