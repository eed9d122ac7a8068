//! Configuration files for the programs' settings: built-in defaults < a TOML
//! file (`--config PATH` or `<PROGRAM>_CONFIG`) < environment variables <
//! command-line flags, merged by figment into one typed struct.
//!
//! clap still parses flags and environment variables (with their value
//! parsers, `--help` and errors); [`Settings`] sorts what it parsed by where
//! each value came from (`ArgMatches::value_source`) into figment layers, and
//! [`Settings::load`] merges them with the file. Keys in the file are the
//! flag names in snake_case (`--http-listen` → `http_listen`). A file value
//! goes through the same clap value parser as the flag would (ranges), after
//! figment has checked its type. Secrets (the args declared with
//! `hide_env_values`) are never serialized, never printed, never quoted in
//! an error: [`Settings::effective_toml`] shows them as `"***"`, and passwords
//! inside URLs (`scheme://user:PASS@host`) too.

use std::collections::BTreeSet;
use std::fmt;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context};
use clap::parser::ValueSource;
use clap::{Arg, ArgMatches, Command};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// What a secret is shown as by [`Settings::effective_toml`].
pub const MASK: &str = "***";

/// The id of the `--config` flag (so no setting may be called `config`).
const CONFIG_ARG: &str = "config";

/// A program's settings struct that can also come from a TOML file: a clap
/// `Args` struct whose fields (de)serialize under their arg ids.
///
/// Secret fields carry `#[serde(default, skip_serializing, deserialize_with =
/// "plumbing::config::secret")]` and their arg `hide_env_values = true`.
pub trait ConfigFile: clap::Args + clap::FromArgMatches + Serialize + DeserializeOwned {
    /// The environment variable naming the file, e.g. `GATEWAY_CONFIG`.
    const FILE_ENV: &'static str;

    /// Rules between settings that clap enforces among flags only (`requires`,
    /// `conflicts_with`), checked again on the merged result. The error must
    /// not quote a secret.
    fn check(&self) -> anyhow::Result<()> {
        Ok(())
    }
}

/// `T`'s flags plus `--config PATH`, as parsed: each value sorted into the
/// layer it came from, merged with the file by [`Settings::load`]. Use it
/// where `T` itself was used as clap args (`#[command(flatten)]`, a subcommand).
pub struct Settings<T> {
    file: Option<PathBuf>,
    defaults: Dict,
    env: Dict,
    flags: Dict,
    _config: PhantomData<fn() -> T>,
}

impl<T> fmt::Debug for Settings<T> {
    /// The file and which keys each layer sets, never their values (secrets).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Settings")
            .field("file", &self.file)
            .field("env", &self.env.keys().collect::<Vec<_>>())
            .field("flags", &self.flags.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl<T: ConfigFile> Settings<T> {
    /// The configuration file given, if any.
    pub fn file(&self) -> Option<&Path> {
        self.file.as_deref()
    }

    /// The effective settings: defaults < file < environment < flags.
    /// Errors (naming the file and key, never a secret's value): the file
    /// cannot be read or is not TOML; an unknown key; a value of the wrong
    /// type (naming the expected one) or refused by the flag's own parser;
    /// a broken rule between settings ([`ConfigFile::check`]).
    pub fn load(&self) -> anyhow::Result<T> {
        Ok(self.merged()?.1)
    }

    /// The effective settings as a TOML file (usable as `--config`), every
    /// key in `--help` order under its help text as comments; unset ones
    /// commented out; secrets and URL passwords as `"***"`. Errors: as [`Self::load`].
    pub fn effective_toml(&self) -> anyhow::Result<String> {
        let (figment, _) = self.merged()?;
        let command = args_of::<T>();
        let mut out = String::from(
            "# Effective settings: built-in defaults < --config file < environment < flags.\n\
             # Secrets show as \"***\": put the real ones (or their *_file keys) back\n\
             # before using this as a --config file.\n\n",
        );
        for arg in command.get_arguments().filter(|a| is_setting(a)) {
            let key = arg.get_id().as_str();
            let value = figment.find_value(key).ok().filter(|v| !matches!(v, Value::Empty(..)));
            out.push_str(&comment(arg));
            out.push_str(&match value {
                None => format!("# {key} = (not set)\n\n"),
                Some(_) if is_secret(arg) => format!("{key} = \"{MASK}\"\n\n"),
                Some(value) => format!("{key} = {}\n\n", render(&value)?),
            });
        }
        Ok(out)
    }

    /// The figment of every layer and what it yields.
    fn merged(&self) -> anyhow::Result<(Figment, T)> {
        let command = args_of::<T>();
        let file = match &self.file {
            Some(path) => Some((read_file(path, &command)?, path.as_path())),
            None => None,
        };
        let mut figment = Figment::new().merge(Layer::new("built-in defaults", self.defaults.clone()));
        if let Some((table, path)) = &file {
            let dict = Value::serialize(table).context("the configuration file's values")?;
            figment = figment.merge(Layer::new(file_name(path), dict.into_dict().unwrap_or_default()));
        }
        figment = figment
            .merge(Layer::new("environment", self.env.clone()))
            .merge(Layer::new("command line", self.flags.clone()));
        let config: T = figment.extract().map_err(describe)?;
        if let Some((table, path)) = &file {
            check_with_clap(table, path, &command)?;
        }
        config.check()?;
        Ok((figment, config))
    }
}

/// `T` as `program ARGS…` would run with it (flags, `--config`, the
/// environment, defaults), for tests: clap's error for bad arguments, else
/// [`Settings::load`]'s.
pub fn load_args<T: ConfigFile>(program: &'static str, args: &[&std::ffi::OsStr]) -> anyhow::Result<T> {
    let command = <Settings<T> as clap::Args>::augment_args(Command::new(program));
    let matches =
        command.try_get_matches_from(std::iter::once(program.as_ref()).chain(args.iter().copied()))?;
    <Settings<T> as clap::FromArgMatches>::from_arg_matches(&matches)?.load()
}

/// For a program's unit test of its example configuration file
/// (deploy/*.toml): the file loads to exactly the built-in defaults, and
/// names every setting (set, or commented out as `# key = …`). The error
/// names the first key missing or says the values differ, and how to
/// regenerate the file (`regenerate`, e.g. `gateway config`).
pub fn check_example_file<T: ConfigFile>(
    program: &'static str,
    path: &Path,
    regenerate: &str,
) -> anyhow::Result<()> {
    let load = |args: &[&std::ffi::OsStr]| {
        Ok::<_, anyhow::Error>(serde_json::to_value(load_args::<T>(program, args)?)?)
    };
    let name = path.display();
    let from_file = load(&["--config".as_ref(), path.as_os_str()])?;
    anyhow::ensure!(
        from_file == load(&[])?,
        "{name} does not yield the defaults (regenerate: `{regenerate}`)"
    );
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {name}"))?;
    let command = T::augment_args(Command::new(program));
    for arg in command.get_arguments().filter(|a| a.get_long().is_some()) {
        let key = arg.get_id().as_str();
        let line = |prefix: &str| text.lines().any(|l| l.starts_with(&format!("{prefix}{key} = ")));
        anyhow::ensure!(line("") || line("# "), "{name} lacks `{key}` (regenerate: `{regenerate}`)");
    }
    Ok(())
}

impl<T: ConfigFile> clap::FromArgMatches for Settings<T> {
    fn from_arg_matches(matches: &ArgMatches) -> Result<Self, clap::Error> {
        let typed = T::from_arg_matches(matches)?;
        let values = Value::serialize(&typed).ok().and_then(Value::into_dict).ok_or_else(|| {
            clap::Error::raw(clap::error::ErrorKind::Io, "settings do not serialize to a table\n")
        })?;
        let mut settings = Settings {
            file: matches.get_one::<PathBuf>(CONFIG_ARG).cloned(),
            defaults: Dict::new(),
            env: Dict::new(),
            flags: Dict::new(),
            _config: PhantomData,
        };
        for arg in args_of::<T>().get_arguments().filter(|a| is_setting(a)) {
            let id = arg.get_id().as_str();
            let value = if is_secret(arg) { raw_text(matches, id) } else { values.get(id).cloned() };
            let layer = match matches.value_source(id) {
                Some(ValueSource::CommandLine) => &mut settings.flags,
                Some(ValueSource::EnvVariable) => &mut settings.env,
                _ => &mut settings.defaults,
            };
            if let Some(value) = value {
                layer.insert(id.to_owned(), value);
            }
        }
        Ok(settings)
    }

    fn update_from_arg_matches(&mut self, matches: &ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(matches)?;
        Ok(())
    }
}

impl<T: ConfigFile> clap::Args for Settings<T> {
    fn augment_args(cmd: Command) -> Command {
        T::augment_args(cmd).arg(config_arg::<T>())
    }

    fn augment_args_for_update(cmd: Command) -> Command {
        T::augment_args_for_update(cmd).arg(config_arg::<T>())
    }
}

fn config_arg<T: ConfigFile>() -> Arg {
    Arg::new(CONFIG_ARG)
        .long(CONFIG_ARG)
        .env(T::FILE_ENV)
        .value_name("PATH")
        .value_parser(clap::value_parser!(PathBuf))
        .help(
            "A TOML file of settings: keys are the flag names in snake_case. Precedence: \
             built-in defaults < this file < environment variables < flags",
        )
}

/// `T`'s args alone (without `--config`, `--help`).
fn args_of<T: ConfigFile>() -> Command {
    T::augment_args(Command::new("settings").disable_help_flag(true).disable_version_flag(true))
}

/// Whether `arg` is a setting (a key of the file), not `--help` or a positional.
fn is_setting(arg: &Arg) -> bool {
    arg.get_long().is_some() && arg.get_id().as_str() != CONFIG_ARG
}

/// Secrets are the args whose environment values clap hides.
fn is_secret(arg: &Arg) -> bool {
    arg.is_hide_env_values_set()
}

/// A secret as the user wrote it (it is never serialized from its type).
fn raw_text(matches: &ArgMatches, id: &str) -> Option<Value> {
    let text = matches.get_raw(id)?.next()?.to_str()?.to_owned();
    Some(Value::from(text))
}

/// One layer: figment merges them and names the one an error comes from.
struct Layer {
    name: String,
    values: Dict,
}

impl Layer {
    fn new(name: impl Into<String>, values: Dict) -> Layer {
        Layer { name: name.into(), values }
    }
}

impl Provider for Layer {
    fn metadata(&self) -> Metadata {
        Metadata::named(self.name.clone())
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        Ok(Profile::Default.collect(self.values.clone()))
    }
}

fn file_name(path: &Path) -> String {
    format!("configuration file {}", path.display())
}

/// The file as a TOML table with only known keys. A syntax error gives its
/// line and column, never the line itself (it may hold a secret).
fn read_file(path: &Path, command: &Command) -> anyhow::Result<toml::Table> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the configuration file {}", path.display()))?;
    let table: toml::Table = toml::from_str(&text).map_err(|e| {
        let at = e.span().map(|span| line_column(&text, span.start)).unwrap_or_default();
        anyhow!("{}{at}: not valid TOML: {}", file_name(path), e.message().trim_end())
    })?;
    let known: BTreeSet<&str> =
        command.get_arguments().filter(|a| is_setting(a)).map(|a| a.get_id().as_str()).collect();
    let unknown: Vec<&str> = table.keys().map(String::as_str).filter(|k| !known.contains(k)).collect();
    if let Some(first) = unknown.first() {
        let hint = command
            .get_arguments()
            .find(|a| a.get_long() == Some(first) || a.get_long() == Some(&first.replace('_', "-")))
            .map(|a| format!(" (did you mean `{}`?)", a.get_id()))
            .unwrap_or_default();
        anyhow::bail!(
            "{}: unknown key{} {}{hint}; the keys are the flag names in snake_case (see --help)",
            file_name(path),
            if unknown.len() > 1 { "s" } else { "" },
            unknown.iter().map(|k| format!("`{k}`")).collect::<Vec<_>>().join(", ")
        );
    }
    Ok(table)
}

/// `:LINE:COLUMN` (1-based) of byte `offset` in `text`.
fn line_column(text: &str, offset: usize) -> String {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    format!(":{line}:{column}")
}

/// The file's values through the flags' own value parsers (ranges and the
/// like), which figment's type check does not know. Secrets are skipped:
/// their deserializer parsed them already, and clap's error would quote them.
fn check_with_clap(table: &toml::Table, path: &Path, command: &Command) -> anyhow::Result<()> {
    for arg in command.get_arguments().filter(|a| is_setting(a) && !is_secret(a)) {
        let key = arg.get_id().as_str();
        let Some(value) = table.get(key) else { continue };
        let items = match value {
            toml::Value::Array(items) => items.iter().collect(),
            one => vec![one],
        };
        for item in items {
            let text = match item {
                toml::Value::String(s) => s.clone(),
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Float(f) => f.to_string(),
                toml::Value::Boolean(b) => b.to_string(),
                _ => continue,
            };
            parse_alone(arg, &text).map_err(|e| {
                let why = e.to_string();
                let why = why.lines().next().unwrap_or_default().trim_start_matches("error: ").to_owned();
                anyhow!("{}: key `{key}`: {why}", file_name(path))
            })?;
        }
    }
    Ok(())
}

/// `--LONG=TEXT` through `arg`'s value parser, alone (without the rules
/// that tie it to other args, checked by [`ConfigFile::check`]).
fn parse_alone(arg: &Arg, text: &str) -> Result<ArgMatches, clap::Error> {
    use clap::builder::Resettable::Reset;
    let alone = arg
        .clone()
        .requires(Reset)
        .conflicts_with(Reset)
        .env(Reset)
        .default_value(Reset)
        .value_delimiter(Reset)
        .action(clap::ArgAction::Set);
    let flag = format!("--{}={text}", arg.get_long().unwrap_or_default());
    Command::new("config").no_binary_name(true).arg(alone).try_get_matches_from([flag])
}

/// figment's errors, one line each: the layer (file, environment, command
/// line), the key, what is wrong (the expected type).
fn describe(error: figment::Error) -> anyhow::Error {
    let lines: Vec<String> = error
        .into_iter()
        .map(|e| {
            let source =
                e.metadata.as_ref().map_or_else(|| "configuration".to_owned(), |m| m.name.to_string());
            match e.path.join(".") {
                key if key.is_empty() => format!("{source}: {}", e.kind),
                key => format!("{source}: key `{key}`: {}", e.kind),
            }
        })
        .collect();
    anyhow!("{}", lines.join("\n"))
}

/// A value as TOML (inline), passwords in URLs masked.
fn render(value: &Value) -> anyhow::Result<String> {
    let value = toml::Value::try_from(value).context("rendering a setting as TOML")?;
    Ok(mask_urls(value).to_string())
}

fn mask_urls(value: toml::Value) -> toml::Value {
    match value {
        toml::Value::String(s) => toml::Value::String(mask_url_passwords(&s)),
        toml::Value::Array(items) => toml::Value::Array(items.into_iter().map(mask_urls).collect()),
        other => other,
    }
}

/// `scheme://user:PASS@host…` → `scheme://user:***@host…`, for each
/// comma-separated URL in `text` (broker lists); other text unchanged.
pub fn mask_url_passwords(text: &str) -> String {
    let masked: Vec<String> = text.split(',').map(mask_one_url).collect();
    masked.join(",")
}

fn mask_one_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else { return url.to_owned() };
    let rest = &url[scheme_end..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else { return url.to_owned() };
    let Some(colon) = rest[..at].find(':') else { return url.to_owned() };
    format!("{}{}:{MASK}{}", &url[..scheme_end], &rest[..colon], &rest[at..])
}

/// The arg's help as `# ` comment lines wrapped at 78 columns.
fn comment(arg: &Arg) -> String {
    let help = arg.get_long_help().or(arg.get_help()).map(ToString::to_string).unwrap_or_default();
    let mut out = String::new();
    for paragraph in help.split("\n\n") {
        let mut line = String::from("#");
        for word in paragraph.split_whitespace() {
            if line.len() + 1 + word.len() > 78 && line.len() > 1 {
                out.push_str(&line);
                out.push('\n');
                line = String::from("#");
            }
            line.push(' ');
            line.push_str(word);
        }
        out.push_str(&line);
        out.push('\n');
    }
    if let Some(env) = arg.get_env() {
        out.push_str(&format!(
            "# (flag --{}, environment {})\n",
            arg.get_long().unwrap_or_default(),
            env.to_string_lossy()
        ));
    }
    out
}

/// `deserialize_with` for an optional secret (`Option<T>`, `T: FromStr`):
/// from a string, parsed by `T::from_str`. Its errors never show the value
/// (serde's own would, e.g. "found unsigned int `1234`"); `T::Err` must not
/// quote it either.
pub fn secret<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: std::str::FromStr,
    T::Err: fmt::Display,
{
    deserializer.deserialize_option(SecretVisitor(PhantomData))
}

struct SecretVisitor<T>(PhantomData<fn() -> T>);

impl<T> SecretVisitor<T> {
    fn refuse<E: serde::de::Error>(what: &str) -> Result<Option<T>, E> {
        Err(E::custom(format!("invalid type: found {what} (not shown), expected a string")))
    }
}

impl<'de, T> serde::de::Visitor<'de> for SecretVisitor<T>
where
    T: std::str::FromStr,
    T::Err: fmt::Display,
{
    type Value = Option<T>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a secret string")
    }

    fn visit_none<E: serde::de::Error>(self) -> Result<Option<T>, E> {
        Ok(None)
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<Option<T>, E> {
        Ok(None)
    }

    fn visit_some<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<Option<T>, D::Error> {
        deserializer.deserialize_str(self)
    }

    fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Option<T>, E> {
        text.parse().map(Some).map_err(|e: T::Err| E::custom(format!("not usable (value not shown): {e}")))
    }

    fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<Option<T>, E> {
        Self::refuse("a bool")
    }

    fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<Option<T>, E> {
        Self::refuse("an integer")
    }

    fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<Option<T>, E> {
        Self::refuse("an integer")
    }

    fn visit_i128<E: serde::de::Error>(self, _: i128) -> Result<Option<T>, E> {
        Self::refuse("an integer")
    }

    fn visit_u128<E: serde::de::Error>(self, _: u128) -> Result<Option<T>, E> {
        Self::refuse("an integer")
    }

    fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<Option<T>, E> {
        Self::refuse("a float")
    }

    fn visit_bytes<E: serde::de::Error>(self, _: &[u8]) -> Result<Option<T>, E> {
        Self::refuse("bytes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use serde::Deserialize;

    /// A settings struct like the programs' own, with one of each kind.
    #[derive(Debug, Clone, clap::Args, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Demo {
        /// Where to listen.
        #[arg(long, env = "DEMO_LISTEN", default_value = "127.0.0.1:80")]
        listen: std::net::SocketAddr,
        /// How many, 1 to 10.
        #[arg(long, env = "DEMO_COUNT", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=10))]
        count: u32,
        /// A password.
        #[arg(long, env = "DEMO_PASSWORD", hide_env_values = true)]
        #[serde(default, skip_serializing, deserialize_with = "secret")]
        password: Option<crate::mqtt::Password>,
        /// A broker URL.
        #[arg(long, env = "DEMO_BROKER")]
        broker: Option<String>,
        /// Repeatable.
        #[arg(long, env = "DEMO_ITEM", value_delimiter = ';')]
        item: Vec<String>,
    }

    impl ConfigFile for Demo {
        const FILE_ENV: &'static str = "DEMO_CONFIG";
    }

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        settings: Settings<Demo>,
    }

    fn with_file(text: &str, args: &[&str]) -> (tempfile::NamedTempFile, Settings<Demo>) {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), text).unwrap();
        let path = file.path().to_str().unwrap().to_owned();
        let argv = ["demo", "--config", &path].into_iter().chain(args.iter().copied());
        (file, Cli::try_parse_from(argv).unwrap().settings)
    }

    #[test]
    fn the_file_overrides_defaults_and_flags_override_the_file() {
        let (_f, settings) = with_file("count = 7\nitem = [\"a\", \"b\"]\n", &["--listen", "127.0.0.1:9"]);
        let demo = settings.load().unwrap();
        assert_eq!((demo.count, demo.item.as_slice()), (7, ["a", "b"].map(String::from).as_slice()));
        assert_eq!(demo.listen.port(), 9);
        let (_f, settings) = with_file("count = 7\n", &["--count", "2"]);
        assert_eq!(settings.load().unwrap().count, 2);
    }

    #[test]
    fn unknown_keys_wrong_types_and_ranges_are_named() {
        let (_f, settings) = with_file("count = 2\ncounts = 3\n", &[]);
        let error = settings.load().unwrap_err().to_string();
        assert!(error.contains("unknown key `counts`") && error.contains("configuration file"), "{error}");
        let (_f, settings) = with_file("count = \"many\"\n", &[]);
        let error = settings.load().unwrap_err().to_string();
        assert!(error.contains("key `count`") && error.contains("expected u32"), "{error}");
        let (_f, settings) = with_file("count = 11\n", &[]);
        let error = settings.load().unwrap_err().to_string();
        assert!(error.contains("key `count`") && error.contains("1..=10"), "{error}");
    }

    #[test]
    fn secrets_load_from_the_file_and_are_never_shown() {
        let (_f, settings) =
            with_file("password = \"hunter2-pw\"\nbroker = \"mqtt://u:url-pw@h:1,mqtt://h:2\"\n", &[]);
        assert_eq!(settings.load().unwrap().password.unwrap().expose(), "hunter2-pw");
        let shown = settings.effective_toml().unwrap();
        assert!(!shown.contains("hunter2") && !shown.contains("url-pw"), "{shown}");
        assert!(
            shown.contains("password = \"***\"") && shown.contains("mqtt://u:***@h:1,mqtt://h:2"),
            "{shown}"
        );
        assert!(!format!("{settings:?}").contains("hunter2"));
        let (_f, settings) = with_file("password = 123456789\n", &[]);
        let error = settings.load().unwrap_err().to_string();
        assert!(error.contains("key `password`") && !error.contains("123456789"), "{error}");
        let (_f, settings) = with_file("password = \"unterminated-secret\n", &[]);
        let error = settings.load().unwrap_err().to_string();
        assert!(error.contains(":1:") && !error.contains("unterminated-secret"), "{error}");
    }

    #[test]
    fn the_printed_configuration_loads_back() {
        let (_f, settings) = with_file("count = 4\nitem = [\"x\"]\n", &[]);
        let shown = settings.effective_toml().unwrap();
        assert!(shown.contains("# How many, 1 to 10\n") && shown.contains("# broker = (not set)"), "{shown}");
        let (_f, again) = with_file(&shown, &[]);
        let demo = again.load().unwrap();
        assert_eq!((demo.count, demo.item.len(), demo.listen.port()), (4, 1, 80));
    }

    #[test]
    fn url_passwords_are_masked() {
        assert_eq!(mask_url_passwords("mysql://root:pw@db:3306/gw"), "mysql://root:***@db:3306/gw");
        assert_eq!(mask_url_passwords("mqtt://user@h:1"), "mqtt://user@h:1");
        assert_eq!(mask_url_passwords("sqlite:gateway.db"), "sqlite:gateway.db");
        assert_eq!(mask_url_passwords("mqtts://a:b@c:1,mqtt://d:2"), "mqtts://a:***@c:1,mqtt://d:2");
    }
}
