//! The Prometheus endpoints of the controller and the agent, scraped for real.

use drover_tests::{Cluster, PATIENCE, bin, eventually, free_tcp, metric_value, scrape};

#[test]
fn controller_and_agent_metrics() {
    let c = Cluster::new();
    let cm = free_tcp();
    let (_ctl, addr) =
        c.start_controller_with("127.0.0.1:0", &["--metrics-listen", &cm.to_string()]);
    let (_agent, am) = c.start_agent_with_metrics("agent-1", addr, &[]);
    eventually("agent connected", PATIENCE, || {
        (metric_value(&scrape(cm), "drover_agents_connected") == Some(1.0)).then_some(())
    });
    // The audit trail's counters are there from the start, at zero: an alert on their
    // increase sees the first failure.
    let fresh = scrape(cm);
    for counter in [
        "drover_audit_write_failures_total",
        "drover_audit_refusals_unrecorded_total",
        "drover_audit_records_total{outcome=\"failed\"}",
    ] {
        assert_eq!(
            metric_value(&fresh, counter),
            Some(0.0),
            "{counter}: {fresh}"
        );
    }
    let file = c.dir.path().join("m.toml");
    std::fs::write(
        &file,
        format!(
            "[instances.agent-1]\n[defaults]\nreadiness = {{ kind = \"start-period\", period = \"0s\" }}\n[nodes.a]\ninstance = \"agent-1\"\ncommand = [\"{p}\"]\n[nodes.b]\ninstance = \"agent-1\"\ncommand = [\"{p}\", \"--stdout-rate\", \"1000\"]\n",
            p = bin("drover-testprog").display()
        ),
    )
    .unwrap();
    assert_eq!(
        c.drover(addr, &["deploy-config", file.to_str().unwrap()])
            .code,
        Some(0)
    );
    let page = eventually(
        "nodes running in the controller's metrics",
        PATIENCE,
        || {
            let page = scrape(cm);
            (metric_value(&page, "drover_nodes{state=\"RUNNING\"}") == Some(2.0)).then_some(page)
        },
    );
    assert_eq!(
        metric_value(&page, "drover_requests_total{request=\"deploy\"}"),
        Some(1.0),
        "{page}"
    );
    assert_eq!(
        metric_value(&page, "drover_deploy_duration_seconds_count"),
        Some(1.0),
        "{page}"
    );
    assert_eq!(
        metric_value(&page, "drover_deploys_total{result=\"ok\"}"),
        Some(1.0),
        "{page}"
    );
    assert!(page.contains("# TYPE drover_request_duration_seconds histogram"));

    let agent_page = scrape(am);
    assert_eq!(
        metric_value(&agent_page, "drover_agent_nodes{state=\"RUNNING\"}"),
        Some(2.0),
        "{agent_page}"
    );
    assert!(metric_value(&agent_page, "drover_agent_rss_bytes").is_some_and(|v| v > 0.0));
    assert!(
        metric_value(&agent_page, "drover_agent_node_rss_bytes{node=\"a\"}")
            .is_some_and(|v| v > 0.0)
    );
    // The CPU a busy node's cgroup used.
    eventually("the busy node's CPU time counted", PATIENCE, || {
        metric_value(
            &scrape(am),
            "drover_agent_node_cpu_seconds_total{node=\"b\"}",
        )
        .is_some_and(|v| v > 0.0)
        .then_some(())
    });

    // Audit records by outcome: the stage and the deploy, then a request the caller's
    // scope lacks.
    c.issue_scoped("viewer", drover_proto::access::Scope::Viewer);
    let out = c.drover_as("viewer", addr, &["restart", "a"]);
    assert_ne!(out.code, Some(0), "a viewer may not restart");
    let page = scrape(cm);
    assert_eq!(
        metric_value(&page, "drover_audit_records_total{outcome=\"ok\"}"),
        Some(2.0),
        "{page}"
    );
    assert_eq!(
        metric_value(&page, "drover_audit_records_total{outcome=\"refused\"}"),
        Some(1.0),
        "{page}"
    );
}
