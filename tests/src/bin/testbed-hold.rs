//! Builds the motivating story's testbed and holds it until stdin closes (then tears it down).
//! For poking at by hand (`ip netns exec <pod ns> ...`), and for the leftover-cleanup test,
//! which kills this process with SIGKILL so that its teardown never runs.
//!
//! Prints one JSON line: `{"suffix", "namespaces", "cgroups", "dns_log", "pod_netns"}`.
use std::{io::Read, net::Ipv4Addr, process::ExitCode};

use observer_tests::{CgroupDriver, DnsConfig, PodSpec, QosClass, Testbed};

fn main() -> ExitCode {
    match hold() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("testbed-hold: {e:?}");
            ExitCode::FAILURE
        }
    }
}

fn hold() -> observer_tests::Result<()> {
    let tb = Testbed::new()?;
    let db = tb.add_external_host_at("db", Ipv4Addr::new(203, 0, 113, 10))?;
    let _listener = db.listen_tcp(5432)?;
    let dns = tb.start_dns(
        DnsConfig::dnsmasq()
            .local_zone("another-lab.com")
            .record("db.another-lab.com", db.ipv4()),
    )?;
    let pod = tb.add_pod(
        PodSpec::new("web")
            .search([
                "simple-web-app.svc.cluster.local",
                "svc.cluster.local",
                "cluster.local",
                "another-lab.com",
            ])
            .ndots(5),
    )?;
    tb.host_cgroup("hold")?;
    tb.kube_cgroup(CgroupDriver::Cgroupfs, QosClass::BestEffort)?;
    let _sleeper = pod.command("sleep").arg("3600").spawn()?;
    let report = serde_json::json!({
        "suffix": tb.run_id().suffix(),
        "namespaces": tb.namespaces(),
        "cgroups": tb.cgroup_dirs(),
        "dns_log": dns.log_path(),
        "pod_netns": pod.netns().name(),
        "etc_netns": pod.resolv_conf_path().parent(),
        "state_dir": tb.state_dir(),
    });
    println!("{report}");
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
    Ok(())
}
