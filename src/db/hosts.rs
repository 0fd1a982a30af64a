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
//! applies to each host's (and each of its addresses') whole connection;
//! so does [`connect`] here, and the pools' manager with [`attempts`].

use std::net::IpAddr;
use std::time::Duration;

use tokio_postgres::config::Host;
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::{Client, Config, Connection, Socket};

use super::error::pg_error_text;

/// Connect to the first host of `cfg` (and address of that host) that
/// completes a whole connection (TCP, TLS, start-up, authentication, the
/// `target_session_attrs` check) within [`per_host_timeout`], trying them
/// in order (from a random host with `load_balance_hosts=random`). The
/// error names each one tried and why it was passed over.
pub async fn connect<T>(
    cfg: &Config,
    tls: T,
    bound: Duration,
) -> Result<(Client, Connection<Socket, T::Stream>), String>
where
    T: MakeTlsConnect<Socket> + Clone,
{
    let per_host = per_host_timeout(cfg, bound);
    let mut why = Vec::new();
    let tries = attempts(&each_host(cfg), random(cfg), per_host).await;
    let several = tries.len() > 1;
    for one in tries {
        let reason = match tokio::time::timeout(per_host, one.connect(tls.clone())).await {
            Ok(Ok(connected)) => return Ok(connected),
            Ok(Err(e)) => pg_error_text(&e),
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

/// How long one host (one address) may take for its whole connection: the
/// URL's `connect_timeout` when it is lower than `bound` (the caller's own
/// budget: the pool's checkout, the start-up's), else `bound`. A larger
/// URL value would let a hung first host eat the caller's whole budget.
pub fn per_host_timeout(cfg: &Config, bound: Duration) -> Duration {
    cfg.get_connect_timeout().copied().unwrap_or(bound).min(bound)
}

/// Whether `cfg` asks for its hosts in a random order.
pub fn random(cfg: &Config) -> bool {
    cfg.get_load_balance_hosts() == tokio_postgres::config::LoadBalanceHosts::Random
}

/// The connections to try, in order, for one connect: `hosts` (from
/// [`each_host`]) from a random one when `random`, each host name resolved
/// now into one config per address (host name kept, for TLS), so that a
/// name with a hung address and a good one (a DNS round robin, a headless
/// service) is not stuck on the first. A name that does not resolve within
/// `per_host` is left to tokio-postgres, which reports it.
pub async fn attempts(hosts: &[Config], random: bool, per_host: Duration) -> Vec<Config> {
    let mut order: Vec<&Config> = hosts.iter().collect();
    if random && order.len() > 1 {
        let start = (uuid::Uuid::new_v4().as_u128() % order.len() as u128) as usize;
        order.rotate_left(start);
    }
    let mut out = Vec::with_capacity(order.len());
    for one in order {
        out.extend(addresses(one, per_host).await);
    }
    out
}

/// `one` once per address its TCP host name resolves to now.
async fn addresses(one: &Config, per_host: Duration) -> Vec<Config> {
    let name = match one.get_hosts() {
        [Host::Tcp(h)] if one.get_hostaddrs().is_empty() && h.parse::<IpAddr>().is_err() => h.clone(),
        _ => return vec![one.clone()],
    };
    let port = one.get_ports().first().copied().unwrap_or(5432);
    let Ok(Ok(found)) = tokio::time::timeout(per_host, tokio::net::lookup_host((name.as_str(), port))).await else {
        return vec![one.clone()];
    };
    let mut ips: Vec<IpAddr> = Vec::new();
    for a in found {
        if !ips.contains(&a.ip()) {
            ips.push(a.ip());
        }
    }
    if ips.len() <= 1 {
        return vec![one.clone()];
    }
    ips.into_iter()
        .map(|ip| {
            let mut c = one.clone();
            c.hostaddr(ip);
            c
        })
        .collect()
}

/// `host:port` (`host (address):port` for one of a name's addresses) of a
/// one-host config, for an error.
pub fn label(cfg: &Config) -> String {
    let addr = cfg.get_hostaddrs().first();
    let host = match (cfg.get_hosts().first(), addr) {
        (Some(Host::Tcp(h)), Some(a)) => format!("{h} ({a})"),
        (Some(Host::Tcp(h)), None) => h.clone(),
        #[cfg(unix)]
        (Some(Host::Unix(p)), _) => p.display().to_string(),
        (None, a) => a.map(ToString::to_string).unwrap_or_default(),
    };
    format!("{host}:{}", cfg.get_ports().first().copied().unwrap_or(5432))
}

/// One config per host of `cfg`, in the URL's order; `cfg` itself when it
/// names one host, or when its hosts and ports do not pair up
/// (tokio-postgres then reports that). [`attempts`] orders and resolves
/// them at each connect.
pub fn each_host(cfg: &Config) -> Vec<Config> {
    let (hosts, addrs, ports) = (cfg.get_hosts(), cfg.get_hostaddrs(), cfg.get_ports());
    let n = hosts.len().max(addrs.len());
    let paired =
        (hosts.is_empty() || addrs.is_empty() || hosts.len() == addrs.len()) && (ports.len() <= 1 || ports.len() == n);
    if n <= 1 || !paired {
        return vec![cfg.clone()];
    }
    (0..n)
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

    #[tokio::test]
    async fn random_order_still_tries_every_host_once() {
        let cfg =
            Config::from_str("host=10.0.0.1,10.0.0.2,10.0.0.3,10.0.0.4 load_balance_hosts=random").expect("config");
        let hosts = each_host(&cfg);
        let mut firsts = std::collections::BTreeSet::new();
        for _ in 0..50 {
            let tries = attempts(&hosts, random(&cfg), Duration::from_millis(200)).await;
            let names: Vec<String> = tries.iter().map(label).collect();
            firsts.insert(names[0].clone());
            let mut sorted = names.clone();
            sorted.sort();
            assert_eq!(
                sorted,
                ["10.0.0.1:5432", "10.0.0.2:5432", "10.0.0.3:5432", "10.0.0.4:5432"]
            );
        }
        assert!(firsts.len() > 1, "a random first host: {firsts:?}");
    }

    #[tokio::test]
    async fn a_name_is_tried_once_per_address() {
        // localhost resolves to 127.0.0.1 (and ::1 where configured).
        let cfg = Config::from_str("host=localhost,127.0.0.1 port=5433").expect("config");
        let tries = attempts(&each_host(&cfg), false, Duration::from_secs(2)).await;
        let labels: Vec<String> = tries.iter().map(label).collect();
        assert_eq!(labels.last().map(String::as_str), Some("127.0.0.1:5433"), "{labels:?}");
        assert!(labels[0].starts_with("localhost"), "{labels:?}");
        for t in &tries[..tries.len() - 1] {
            assert_eq!(t.get_hosts(), &[Host::Tcp("localhost".into())], "the name kept for TLS");
        }
    }

    #[test]
    fn the_urls_timeout_counts_only_when_it_is_lower() {
        let cfg = Config::from_str("host=a connect_timeout=10").expect("config");
        assert_eq!(
            per_host_timeout(&cfg, Duration::from_millis(2500)),
            Duration::from_millis(2500)
        );
        let cfg = Config::from_str("host=a connect_timeout=1").expect("config");
        assert_eq!(per_host_timeout(&cfg, Duration::from_secs(5)), Duration::from_secs(1));
        let cfg = Config::from_str("host=a").expect("config");
        assert_eq!(per_host_timeout(&cfg, Duration::from_secs(5)), Duration::from_secs(5));
    }
}
