//! Connecting to a URL with several hosts the way libpq does: each host in
//! turn, each bounded as a whole by the connect timeout.
//!
//! tokio-postgres tries the hosts of `postgres://…@h1,h2/…` in order, but
//! its `connect_timeout` bounds only each TCP connect. A first host that
//! accepts the socket and then answers nothing (every process frozen, a
//! paused VM, a partition after the SYN) holds the start-up,
//! authentication and `target_session_attrs` check for as long as the
//! caller waits, and the second host is never tried: a promoted standby
//! behind a hung old primary was never reached. libpq's `connect_timeout`
//! applies to each host's whole connection; so does [`connect`] here.

use std::time::Duration;

use tokio_postgres::config::Host;
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::{Client, Config, Connection, Socket};

/// Connect to the first host of `cfg` that completes a whole connection
/// (TCP, TLS, start-up, authentication, the `target_session_attrs` check)
/// within the config's `connect_timeout` (`fallback` when it has none),
/// trying them in order (in a random order with
/// `load_balance_hosts=random`). The error names each host tried and why
/// it was passed over.
pub async fn connect<T>(
    cfg: &Config,
    tls: T,
    fallback: Duration,
) -> Result<(Client, Connection<Socket, T::Stream>), String>
where
    T: MakeTlsConnect<Socket> + Clone,
{
    let per_host = cfg.get_connect_timeout().copied().unwrap_or(fallback);
    let mut why = Vec::new();
    let hosts = each_host(cfg);
    let several = hosts.len() > 1;
    for one in hosts {
        let reason = match tokio::time::timeout(per_host, one.connect(tls.clone())).await {
            Ok(Ok(connected)) => return Ok(connected),
            Ok(Err(e)) => super::pg_error_text(&e),
            Err(_) => format!("no answer within {}ms", per_host.as_millis()),
        };
        why.push(if several {
            format!("{}: {reason}", label(&one))
        } else {
            reason
        });
    }
    Err(why.join("; "))
}

/// `host:port` of a one-host config, for an error.
fn label(cfg: &Config) -> String {
    let host = match cfg.get_hosts().first() {
        Some(Host::Tcp(h)) => h.clone(),
        #[cfg(unix)]
        Some(Host::Unix(p)) => p.display().to_string(),
        None => cfg.get_hostaddrs().first().map(ToString::to_string).unwrap_or_default(),
    };
    format!("{host}:{}", cfg.get_ports().first().copied().unwrap_or(5432))
}

/// One config per host of `cfg`, in the order to try them; `cfg` itself
/// when it names one host, or when its hosts and ports do not pair up
/// (tokio-postgres then reports that).
pub fn each_host(cfg: &Config) -> Vec<Config> {
    let (hosts, addrs, ports) = (cfg.get_hosts(), cfg.get_hostaddrs(), cfg.get_ports());
    let n = hosts.len().max(addrs.len());
    let paired =
        (hosts.is_empty() || addrs.is_empty() || hosts.len() == addrs.len()) && (ports.len() <= 1 || ports.len() == n);
    if n <= 1 || !paired {
        return vec![cfg.clone()];
    }
    let mut order: Vec<usize> = (0..n).collect();
    if cfg.get_load_balance_hosts() == tokio_postgres::config::LoadBalanceHosts::Random {
        let start = (uuid::Uuid::new_v4().as_u128() % n as u128) as usize;
        order.rotate_left(start);
    }
    order
        .into_iter()
        .map(|i| {
            let mut one = without_hosts(cfg);
            match hosts.get(i) {
                Some(Host::Tcp(h)) => {
                    one.host(h);
                }
                #[cfg(unix)]
                Some(Host::Unix(path)) => {
                    one.host_path(path);
                }
                None => {}
            }
            if let Some(addr) = addrs.get(i) {
                one.hostaddr(*addr);
            }
            if let Some(port) = ports.get(i).or(ports.first()) {
                one.port(*port);
            }
            one
        })
        .collect()
}

/// A copy of `cfg` with no host, host address or port. Every other setting
/// is carried over; the unit test below compares a one-host copy with its
/// original field by field (`Config: PartialEq`), so a setting a new
/// tokio-postgres adds and this misses fails it.
fn without_hosts(cfg: &Config) -> Config {
    let mut c = Config::new();
    if let Some(user) = cfg.get_user() {
        c.user(user);
    }
    if let Some(password) = cfg.get_password() {
        c.password(password);
    }
    if let Some(dbname) = cfg.get_dbname() {
        c.dbname(dbname);
    }
    if let Some(options) = cfg.get_options() {
        c.options(options);
    }
    if let Some(name) = cfg.get_application_name() {
        c.application_name(name);
    }
    c.ssl_mode(cfg.get_ssl_mode());
    c.ssl_negotiation(cfg.get_ssl_negotiation());
    if let Some(t) = cfg.get_connect_timeout() {
        c.connect_timeout(*t);
    }
    if let Some(t) = cfg.get_tcp_user_timeout() {
        c.tcp_user_timeout(*t);
    }
    c.keepalives(cfg.get_keepalives());
    c.keepalives_idle(cfg.get_keepalives_idle());
    if let Some(t) = cfg.get_keepalives_interval() {
        c.keepalives_interval(t);
    }
    if let Some(n) = cfg.get_keepalives_retries() {
        c.keepalives_retries(n);
    }
    c.target_session_attrs(cfg.get_target_session_attrs());
    c.channel_binding(cfg.get_channel_binding());
    c.load_balance_hosts(cfg.get_load_balance_hosts());
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    const EVERY_SETTING: &str = "user=u password=p dbname=d options=-cx=1 application_name=a \
        sslmode=require sslnegotiation=direct connect_timeout=7 tcp_user_timeout=9 keepalives=0 \
        keepalives_idle=11 keepalives_interval=12 keepalives_retries=13 \
        target_session_attrs=read-write channel_binding=require load_balance_hosts=disable";

    #[test]
    fn a_one_host_copy_keeps_every_setting() {
        let cfg = Config::from_str(&format!("host=h1 hostaddr=10.0.0.1 port=5433 {EVERY_SETTING}")).expect("config");
        let mut copy = without_hosts(&cfg);
        copy.host("h1").hostaddr("10.0.0.1".parse().expect("ip")).port(5433);
        assert_eq!(copy, cfg);
        assert_eq!(each_host(&cfg), vec![cfg.clone()]);
    }

    #[test]
    fn each_host_is_its_own_config_in_order_with_its_port() {
        let cfg = Config::from_str(&format!("host=h1,h2,/run/pg port=5433,5434,5435 {EVERY_SETTING}")).expect("config");
        let one = |h: &str, p: u16| Config::from_str(&format!("host={h} port={p} {EVERY_SETTING}")).expect("config");
        assert_eq!(
            each_host(&cfg),
            vec![one("h1", 5433), one("h2", 5434), one("/run/pg", 5435)]
        );
        // URL form: a host without a port has 5432.
        let url = Config::from_str("postgres://u@h1,h2:6000/d?target_session_attrs=read-write").expect("url");
        let hosts = each_host(&url);
        assert_eq!(hosts.len(), 2);
        for (c, (h, p)) in hosts.iter().zip([("h1", 5432), ("h2", 6000)]) {
            assert_eq!(c.get_hosts(), &[Host::Tcp(h.into())]);
            assert_eq!(c.get_ports(), &[p]);
            assert_eq!(c.get_dbname(), Some("d"));
            assert_eq!(
                c.get_target_session_attrs(),
                tokio_postgres::config::TargetSessionAttrs::ReadWrite
            );
        }
    }

    #[test]
    fn unpaired_hosts_and_ports_are_left_to_tokio_postgres() {
        let cfg = Config::from_str("host=h1,h2,h3 port=1,2").expect("config");
        assert_eq!(each_host(&cfg), vec![cfg]);
    }

    #[test]
    fn random_order_still_tries_every_host_once() {
        let cfg = Config::from_str("host=a,b,c,d load_balance_hosts=random").expect("config");
        for _ in 0..50 {
            let mut names: Vec<String> = each_host(&cfg)
                .iter()
                .map(|c| match &c.get_hosts()[0] {
                    Host::Tcp(h) => h.clone(),
                    #[cfg(unix)]
                    Host::Unix(p) => p.display().to_string(),
                })
                .collect();
            names.sort();
            assert_eq!(names, ["a", "b", "c", "d"]);
        }
    }
}
