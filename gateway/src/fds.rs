//! The file-descriptor budget: every connection the gateway holds is a
//! descriptor, and the HTTP listener, the embedded MQTT broker and the
//! database pool live in one process under one limit. At start the soft
//! `RLIMIT_NOFILE` is raised to the hard one, and the limit is split:
//! HTTP connections (`--http-max-connections`), broker connections
//! (`--mqtt-max-connections`, embedded broker only), the database pool, and
//! a reserve (`--fd-reserve`). When the shares do not fit the gateway
//! refuses to start, so that a flood on one (thousands of idle HTTP
//! connections) can never take the descriptors another needs.

use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};

use crate::config::Config;
use crate::store::Backend;

/// Descriptors one client of the embedded broker takes in this process
/// (`broker::guard` stands between it and rumqttd).
pub const DESCRIPTORS_PER_BROKER_CLIENT: usize = 3;

/// How the descriptor limit is shared out (all counts are descriptors).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// The soft `RLIMIT_NOFILE` after raising it.
    pub limit: u64,
    pub http: usize,
    /// 0 with an external broker.
    pub broker: usize,
    pub database: usize,
    pub reserve: usize,
}

impl Budget {
    /// The shares `config` asks for, against `limit`: an error naming each
    /// share and the flags to change when their sum is over the limit.
    pub fn check(config: &Config, limit: u64) -> anyhow::Result<Budget> {
        let database = Backend::of_url(&config.database_url)?.pool_descriptors();
        // Each client of the embedded broker is three descriptors here: its
        // connection to the guard, the guard's to rumqttd, and rumqttd's end.
        let broker = if config.broker.is_none() {
            DESCRIPTORS_PER_BROKER_CLIENT * config.mqtt_max_connections as usize
        } else {
            0
        };
        let budget =
            Budget { limit, http: config.http_max_connections, broker, database, reserve: config.fd_reserve };
        anyhow::ensure!(config.http_max_connections >= 1, "--http-max-connections must be at least 1");
        let needed = budget.needed();
        anyhow::ensure!(
            needed <= limit,
            "the file descriptors this gateway may need do not fit its limit of {limit} (the hard \
             RLIMIT_NOFILE, `ulimit -Hn`): {} HTTP connections (--http-max-connections) + {} embedded \
             descriptors for embedded broker connections (3 × --mqtt-max-connections) + {} for the database pool + {} reserve \
             (--fd-reserve) = {needed}. Lower these, or raise the hard limit (systemd: LimitNOFILE=, \
             docker: --ulimit nofile=)",
            budget.http,
            budget.broker,
            budget.database,
            budget.reserve,
        );
        Ok(budget)
    }

    /// The sum of the shares.
    pub fn needed(&self) -> u64 {
        (self.http + self.broker + self.database + self.reserve) as u64
    }
}

/// Raises the soft descriptor limit to the hard one (an unlimited hard
/// limit: to `needed`, at least) and checks `config`'s shares against it.
/// Errors: the shares do not fit, or the limit cannot be raised far enough.
pub fn raise_and_budget(config: &Config) -> anyhow::Result<Budget> {
    let Rlimit { current, maximum } = getrlimit(Resource::Nofile);
    // `None` is unlimited; a soft limit can only be raised to the hard one.
    let wanted = match maximum {
        Some(hard) => hard,
        None => Budget::check(config, u64::MAX)?.needed().max(current.unwrap_or(0)),
    };
    let limit = match current {
        Some(soft) if soft < wanted => {
            match setrlimit(Resource::Nofile, Rlimit { current: Some(wanted), maximum }) {
                Ok(()) => wanted,
                Err(e) => {
                    tracing::warn!(soft, hard = wanted, error = %e, "cannot raise the soft descriptor limit");
                    soft
                }
            }
        }
        Some(soft) => soft,
        None => u64::MAX,
    };
    let budget = Budget::check(config, limit)?;
    tracing::info!(
        limit,
        http = budget.http,
        broker = budget.broker,
        database = budget.database,
        reserve = budget.reserve,
        "file descriptor budget"
    );
    Ok(budget)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(http: usize, mqtt: u32, reserve: usize) -> Config {
        let any = "127.0.0.1:0".parse().unwrap();
        let mut config = Config::for_local("sqlite:x.db".into(), any, any);
        (config.http_max_connections, config.mqtt_max_connections, config.fd_reserve) = (http, mqtt, reserve);
        config
    }

    #[test]
    fn shares_that_do_not_fit_are_refused_naming_each() {
        let budget = Budget::check(&config(100, 200, 50), 1000).unwrap();
        assert_eq!((budget.needed(), budget.broker, budget.database), (762, 600, 12));
        let err = Budget::check(&config(1024, 4096, 256), 4096).unwrap_err().to_string();
        for part in
            ["4096", "1024 HTTP", "--http-max-connections", "--mqtt-max-connections", "--fd-reserve", "13580"]
        {
            assert!(err.contains(part), "{part} in {err}");
        }
        let mut external = config(1024, 4096, 256);
        external.broker = Some("mqtt://127.0.0.1:1883".into());
        assert_eq!(Budget::check(&external, 4096).unwrap().broker, 0, "no embedded broker, no share");
        assert!(Budget::check(&config(0, 1, 1), 4096).is_err());
    }

    #[test]
    fn the_soft_limit_is_raised_to_the_hard_one() {
        let budget = raise_and_budget(&config(10, 10, 10)).unwrap();
        let Rlimit { current, maximum } = getrlimit(Resource::Nofile);
        assert_eq!(current, maximum.or(current));
        assert_eq!(Some(budget.limit), current);
    }
}
