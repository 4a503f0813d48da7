//! `--output text` and `--output json` lines, written to buffers and read back.
mod export_support;

use std::collections::BTreeSet;

use export_support::*;
use observer::export::{Enriched, JsonWriter, PodIdentity, TextWriter};
use serde_json::{Value, json};

fn json_lines(records: &[Enriched]) -> Vec<Value> {
    let mut writer = JsonWriter::new(Vec::new(), CLOCK);
    for r in records {
        writer.write(r).expect("write to memory");
    }
    let out = String::from_utf8(writer.into_inner()).expect("UTF-8");
    assert!(out.ends_with('\n'));
    out.lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect()
}

#[test]
fn json_seed_story_field_by_field() {
    let lines = json_lines(&[seed_story()]);
    assert_eq!(lines.len(), 1);
    let v = &lines[0];
    let keys: BTreeSet<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    let required = [
        "time",
        "pod",
        "container_id",
        "cgroup_id",
        "pid",
        "comm",
        "destination",
        "outcome",
        "query_name",
        "server_address",
        "resolution",
        "search_chain",
        "egress",
        "flagged",
        "drift",
    ];
    let additions = [
        "workload",
        "container_name",
        "node",
        "source",
        "search_domain",
        "cname_chain",
        "wasted_queries",
        "message",
        "dns_server",
        "dns_from_outside",
    ];
    assert_eq!(
        keys,
        required
            .iter()
            .chain(&additions)
            .copied()
            .collect::<BTreeSet<_>>()
    );

    assert_eq!(
        v["time"], "2025-06-15T15:06:40.008900000Z",
        "RFC 3339 of the outcome"
    );
    assert_eq!(
        v["pod"],
        json!({"namespace": "simple-web-app", "name": "web-7d9f8-abc12", "uid": SEED_POD_UID})
    );
    assert_eq!(v["container_id"], "3f2e1d0c9b8a");
    assert_eq!(v["cgroup_id"], 12345);
    assert_eq!(v["pid"], 4242);
    assert_eq!(v["comm"], "web");
    assert_eq!(
        v["destination"],
        json!({"address": "203.0.113.10", "port": 5432})
    );
    assert_eq!(v["outcome"], "established");
    assert_eq!(v["query_name"], "db");
    assert_eq!(v["server_address"], "db.another-lab.com");
    assert_eq!(v["resolution"], "search-escape");
    let mut chain = Vec::new();
    for domain in SEARCH_LIST {
        let rcode = if domain == "another-lab.com" {
            "NOERROR"
        } else {
            "NXDOMAIN"
        };
        for qtype in ["A", "AAAA"] {
            chain.push(json!({"name": format!("db.{domain}"), "type": qtype, "rcode": rcode}));
        }
    }
    assert_eq!(v["search_chain"], Value::Array(chain));
    assert_eq!(v["egress"], true);
    assert_eq!(v["flagged"], true);
    assert_eq!(v["drift"], false);
    assert_eq!(v["workload"], json!({"kind": "Deployment", "name": "web"}));
    assert_eq!(v["container_name"], "web");
    assert_eq!(v["node"], "node-1");
    assert_eq!(v["source"], json!({"address": "198.18.0.5", "port": 40000}));
    assert_eq!(v["search_domain"], "another-lab.com");
    assert_eq!(v["cname_chain"], json!([]));
    assert_eq!(v["wasted_queries"], 3);
    assert_eq!(
        v["message"],
        "db resolved through search domain another-lab.com to 203.0.113.10, outside the cluster: \
         use db.another-lab.com. if that server is intended, or create the Service db in namespace simple-web-app"
    );
    assert_eq!(v["dns_server"], CLUSTER_DNS, "the server that answered");
    assert_eq!(v["dns_from_outside"], false);
}

/// A pod whose resolver is outside the cluster: the record names the server that answered,
/// in JSON and in the text line.
#[test]
fn dns_served_from_outside_names_the_server() {
    let mut outside = seed_story();
    let chain = std::sync::Arc::make_mut(outside.record.chain.as_mut().unwrap());
    for q in std::sync::Arc::make_mut(&mut chain.queries) {
        q.server = "203.0.113.53".parse().unwrap();
    }
    outside.record.dns_from_outside = true;
    let v = &json_lines(&[outside.clone()])[0];
    assert_eq!(v["dns_server"], "203.0.113.53");
    assert_eq!(v["dns_from_outside"], true);
    let (out, _) = text(&[outside], false);
    assert!(
        out.contains("(via search domain another-lab.com, 3 NXDOMAIN, DNS from 203.0.113.53, outside the cluster)"),
        "{out}"
    );
    let healthy = &json_lines(&[healthy_in_cluster(), host_ip_literal()]);
    assert_eq!(healthy[0]["dns_server"], CLUSTER_DNS);
    assert_eq!(healthy[1]["dns_server"], Value::Null, "no DNS, no server");
    assert_eq!(healthy[1]["dns_from_outside"], false);
}

#[test]
fn json_every_connection_including_partial_identity() {
    let mut uid_only = healthy_in_cluster();
    uid_only.identity.pod = Some(PodIdentity {
        uid: API_POD_UID.into(),
        ..PodIdentity::default()
    });
    uid_only.identity.container = None;
    let lines = json_lines(&[healthy_in_cluster(), uid_only, host_ip_literal()]);
    assert_eq!(
        lines.len(),
        3,
        "JSON has a line for every connection, egress or not"
    );

    let healthy = &lines[0];
    assert_eq!(healthy["resolution"], "in-cluster");
    assert_eq!(healthy["egress"], false);
    assert_eq!(healthy["message"], Value::Null);
    assert_eq!(
        healthy["search_chain"][1],
        json!({"name": "postgres.data.svc.cluster.local", "type": "AAAA", "rcode": null}),
        "an unanswered query has a null rcode"
    );

    let uid_only = &lines[1];
    assert_eq!(
        uid_only["pod"],
        json!({"namespace": null, "name": null, "uid": API_POD_UID}),
        "the UID is known without the Kubernetes API"
    );
    assert_eq!(uid_only["container_id"], Value::Null);
    assert_eq!(uid_only["workload"], Value::Null);

    let host = &lines[2];
    assert_eq!(host["pod"], Value::Null);
    assert_eq!(host["comm"], "curl");
    assert_eq!(host["outcome"], "refused");
    assert_eq!(host["resolution"], "none");
    assert_eq!(host["query_name"], Value::Null);
    assert_eq!(host["server_address"], Value::Null);
    assert_eq!(host["search_chain"], json!([]));
    assert_eq!(
        host["destination"],
        json!({"address": "203.0.113.77", "port": 443})
    );
}

fn text(records: &[Enriched], color: bool) -> (String, Vec<bool>) {
    let mut writer = TextWriter::new(Vec::new(), CLOCK, color);
    let written = records
        .iter()
        .map(|r| writer.write(r).expect("write to memory"))
        .collect();
    (String::from_utf8(writer.into_inner()).unwrap(), written)
}

#[test]
fn text_lines_for_egress_and_flagged_only() {
    let (out, written) = text(
        &[seed_story(), healthy_in_cluster(), host_ip_literal()],
        false,
    );
    assert_eq!(
        written,
        [true, false, true],
        "in-cluster connections are not printed"
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines,
        [
            "2025-06-15T15:06:40.008Z simple-web-app/web-7d9f8-abc12 db -> db.another-lab.com \
             (via search domain another-lab.com, 3 NXDOMAIN) -> 203.0.113.10:5432 established EGRESS FLAGGED: \
             use db.another-lab.com. if that server is intended, or create the Service db in namespace simple-web-app",
            "2025-06-15T15:06:40.090Z host:curl[1200] 203.0.113.77:443 refused EGRESS",
        ]
    );
    assert!(!out.contains('\x1b'), "no colour unless asked");
}

#[test]
fn text_colour_marks_flagged_and_failures() {
    let (out, _) = text(&[seed_story(), host_ip_literal()], true);
    assert!(out.contains("\x1b[1;31mFLAGGED\x1b[0m"), "{out:?}");
    assert!(out.contains("\x1b[33mEGRESS\x1b[0m"));
    assert!(out.contains("\x1b[31mrefused\x1b[0m"));
}

#[test]
fn text_drift_and_cname_escape() {
    let mut cname = seed_story();
    cname.record.resolution = observer::record::Resolution::CnameEscape;
    let chain = std::sync::Arc::make_mut(cname.record.chain.as_mut().unwrap());
    chain.query_name = "db.simple-web-app.svc.cluster.local.".into();
    chain.server_address = "db.simple-web-app.svc.cluster.local".into();
    chain.search_domain = None;
    chain.wasted_queries = 0;
    chain.cname_chain = vec!["db.another-lab.com".into()];
    std::sync::Arc::make_mut(&mut chain.queries).drain(..6);
    cname.record.drift = true;
    let (out, _) = text(&[cname.clone()], false);
    assert_eq!(
        out,
        "2025-06-15T15:06:40.008Z simple-web-app/web-7d9f8-abc12 db.simple-web-app.svc.cluster.local \
         (CNAME db.another-lab.com) -> 203.0.113.10:5432 established EGRESS FLAGGED DRIFT: \
         use db.another-lab.com. if that server is intended, or change what db.simple-web-app.svc.cluster.local points to\n"
    );
    assert_eq!(
        observer::export::flag_message(&cname.record, Some("simple-web-app")).as_deref(),
        Some(
            "db.simple-web-app.svc.cluster.local resolved through CNAME db.another-lab.com to 203.0.113.10, outside the cluster: \
             use db.another-lab.com. if that server is intended, or change what db.simple-web-app.svc.cluster.local points to"
        )
    );
    cname.record.flagged = false;
    assert_eq!(
        observer::export::flag_message(&cname.record, Some("simple-web-app")).as_deref(),
        Some(
            "db.simple-web-app.svc.cluster.local resolved to 203.0.113.10, outside the cluster, where this workload resolved it inside the cluster before: \
             create the Service db in namespace simple-web-app again, or use db.simple-web-app.svc.cluster.local. if that server is intended"
        )
    );
}

/// What would end each kind of chain, said once (`observer::export::fix`) and carried by
/// the JSON message.
#[test]
fn the_fix_for_each_kind_of_chain() {
    let fix = |e: &Enriched| observer::export::fix(&e.record, Some("simple-web-app"));
    assert_eq!(
        fix(&seed_story()).as_deref(),
        Some(
            "use db.another-lab.com. if that server is intended, or create the Service db in namespace simple-web-app"
        )
    );
    assert_eq!(
        observer::export::fix(&seed_story().record, None).as_deref(),
        Some(
            "use db.another-lab.com. if that server is intended, or create the Service db in the pod's namespace"
        ),
        "without the API the namespace is unknown"
    );
    let mut qualified = seed_story();
    std::sync::Arc::make_mut(qualified.record.chain.as_mut().unwrap()).query_name =
        "db.shop".into();
    assert_eq!(
        fix(&qualified).as_deref(),
        Some(
            "use db.another-lab.com. if that server is intended, or create the Service db in namespace shop"
        ),
        "db.shop is the Service db of namespace shop"
    );

    // Amplification: a name with dots walked the whole search list, then answered as is.
    let mut amplified = healthy_in_cluster();
    let chain = std::sync::Arc::make_mut(amplified.record.chain.as_mut().unwrap());
    chain.query_name = "api.partner.example".into();
    chain.server_address = "api.partner.example".into();
    chain.search_domain = None;
    chain.wasted_queries = 3;
    chain.ndots_walk = true;
    assert_eq!(
        fix(&amplified).as_deref(),
        Some("use api.partner.example. or set the pod's dnsConfig ndots to 2")
    );
    let line = &json_lines(&[amplified])[0];
    assert_eq!(
        line["message"],
        "api.partner.example tried 3 names of the search list in vain before api.partner.example answered: \
         use api.partner.example. or set the pod's dnsConfig ndots to 2"
    );

    // A short name completed in the cluster after wasted steps: only the full name helps.
    let mut walked = healthy_in_cluster();
    std::sync::Arc::make_mut(walked.record.chain.as_mut().unwrap()).wasted_queries = 1;
    assert_eq!(
        fix(&walked).as_deref(),
        Some("use postgres.data.svc.cluster.local.")
    );
    assert_eq!(fix(&healthy_in_cluster()), None, "nothing to fix");
    assert_eq!(fix(&host_ip_literal()), None, "no DNS, nothing to say");
}
