//! The machinery behind the one settings table: what a table row is ([`Setting`]) and the
//! macro that turns the list in `settings.rs` into the `Config` struct, the rows, and the
//! code that parses a configuration.

use super::Config;

/// One variable the service reads: a row of the README's configuration table, and how the
/// value is shown, compared and kept on reload.
pub struct Setting {
    pub name: &'static str,
    /// The default as the README states it.
    pub default: &'static str,
    pub help: &'static str,
    /// A running process cannot change it: a reload reports it and keeps the value in force.
    pub restart_required: bool,
    /// Its value is never shown; a reload compares values to report a change.
    pub secret: bool,
    /// How `check-config` shows the value (`None`: read but never used, as `RELOAD`).
    pub(super) show: Option<fn(&Config) -> String>,
    /// Whether two configurations hold the same value.
    pub(super) same: fn(&Config, &Config) -> bool,
    /// Puts the value in force in `current` back into `next`.
    pub(super) keep: fn(&mut Config, &Config),
}

impl Setting {
    /// The value as `check-config` and reload answers show it, secrets masked; `None` for a
    /// variable that is accepted and ignored.
    pub fn shown(&self, config: &Config) -> Option<String> {
        self.show.map(|show| show(config))
    }

    /// Whether `a` and `b` hold different values for this setting (secrets included).
    pub fn differs(&self, a: &Config, b: &Config) -> bool {
        !(self.same)(a, b)
    }

    /// Sets this setting in `next` back to its value in `current`.
    pub fn keep(&self, next: &mut Config, current: &Config) {
        (self.keep)(next, current)
    }
}

/// `true` for the settings that fill no field.
pub(super) fn always_same(_: &Config, _: &Config) -> bool {
    true
}

pub(super) fn keep_nothing(_: &mut Config, _: &Config) {}

/// A copy of a value (Copy or not), for the generated `keep`.
pub(super) fn kept<T: Clone>(value: &T) -> T {
    value.clone()
}

/// Declares every setting once. Each entry is
///
/// ```text
/// /// The field's doc.
/// field: Type = "VARIABLE" {
///     default: "as the README says",
///     help: "what it means",
///     restart: true,            // optional: a reload keeps the value in force
///     secret: true,             // optional: never shown
///     parse: method(args),      // a `Reader` method, called as r.method("VARIABLE", args)
///     show: |c| ...,            // optional: instead of the value's `Shown`
///     same: |a, b| ...,         // optional: instead of comparing the field
///     keep: |next, current| .., // optional: instead of copying the field
/// }
/// ```
///
/// or, for a variable that is accepted and ignored, `"VARIABLE" { default: .., help: .. }`.
/// Arguments of `parse` may name fields declared above (`host(environment)`). Then comes
/// `@derived { .. }`: fields that are no variable of their own, each `field: Type =
/// method(args);`. Produces `Config`, `SETTINGS` (in the order written, the README's), and
/// `parse(&Reader) -> Result<Config, ConfigError>` (before the cross-setting `check`).
///
/// A change to a setting is one entry here (and its line in README and `.env.example`,
/// which tests compare with this table).
macro_rules! settings {
    (@show ; ) => { None };
    (@show $field:ident ; ) => { Some(|c: &Config| Shown::shown(&c.$field)) };
    (@show $field:ident ; $show:expr) => { Some($show) };
    (@same ; ) => { always_same };
    (@same $field:ident ; ) => { |a: &Config, b: &Config| a.$field == b.$field };
    (@same $field:ident ; $same:expr) => { $same };
    (@keep ; ) => { keep_nothing };
    (@keep $field:ident ; ) => {
        |next: &mut Config, current: &Config| next.$field = kept(&current.$field)
    };
    (@keep $field:ident ; $keep:expr) => { $keep };
    (
        $(
            $(
                $(#[doc = $doc:literal])*
                $field:ident: $ty:ty =
            )?
            $name:literal {
                default: $default:literal,
                help: $help:literal,
                $(restart: $restart:literal,)?
                $(secret: $secret:literal,)?
                $(parse: $parse:ident($($arg:expr),*),)?
                $(show: $show:expr,)?
                $(same: $same:expr,)?
                $(keep: $keep:expr,)?
            }
        )*
        @derived {
            $(
                $(#[doc = $ddoc:literal])*
                $dfield:ident: $dty:ty = $dparse:ident($($darg:expr),*);
            )*
        }
    ) => {
        /// Every setting of the service, parsed and checked (see `SETTINGS` for each one's
        /// variable, default and meaning).
        #[derive(Debug, Clone, PartialEq)]
        pub struct Config {
            $($(
                $(#[doc = $doc])*
                pub $field: $ty,
            )?)*
            $(
                $(#[doc = $ddoc])*
                pub $dfield: $dty,
            )*
        }

        /// Every variable the service reads, in the README's order.
        pub const SETTINGS: &[Setting] = &[
            $(Setting {
                name: $name,
                default: $default,
                help: $help,
                restart_required: false $(|| $restart)?,
                secret: false $(|| $secret)?,
                show: settings!(@show $($field)? ; $($show)?),
                same: settings!(@same $($field)? ; $($same)?),
                keep: settings!(@keep $($field)? ; $($keep)?),
            },)*
        ];

        /// Each variable parsed in the table's order (the first invalid one is reported).
        pub(super) fn parse(r: &Reader<'_>) -> Result<Config, ConfigError> {
            $($(
                let $field: $ty = r.$parse($name $(, $arg)*)?;
            )?)*
            $(
                let $dfield: $dty = r.$dparse($($darg),*)?;
            )*
            Ok(Config {
                $($($field,)?)*
                $($dfield,)*
            })
        }
    };
}

pub(super) use settings;
