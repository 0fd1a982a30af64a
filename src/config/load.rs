//! The loading API: read the file, layer it under the environment, and
//! validate the result.

use super::error::ConfigError;
use super::layers;
use super::root::Config;

impl Config {
    /// Load from an optional TOML text and an environment, then validate.
    ///
    /// `path` only names the file in error messages.
    pub fn load_from<I>(path: &str, toml_text: Option<&str>, env: I) -> Result<Config, ConfigError>
    where
        I: IntoIterator<Item = (String, String)>,
    {
        let config = layers::layered(path, toml_text, env)?;
        let problems = config.validate();
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }

    /// Load `path` (when it exists or was named explicitly) and the process environment.
    pub fn load(path: &str, must_exist: bool) -> Result<Config, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => Some(t),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !must_exist => None,
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.to_string(),
                    source,
                })
            }
        };
        Config::load_from(path, text.as_deref(), std::env::vars())
    }
}
