//! Components, nodes and status over the registry's queries, and plugins over the plugin
//! host's.

use std::{collections::HashMap, sync::Arc};

use axum::{
    extract::{Query, State},
    http::StatusCode,
};
use cim_events::{
    plugin,
    proto::{
        plugin::{ListPlugins, ListReply},
        registry::{GetOverview, Instance, InstanceList, ListInstances, ListNodes, Node, NodeList, Overview},
    },
    registry,
};
use serde_json::{Value, json};

use super::{ApiResult, json_response, request};
use crate::AppState;

fn instance_json(i: &Instance) -> Value {
    json!({
        "instance_id": i.instance_id, "component": i.component, "service": i.service, "version": i.version,
        "node": i.node, "capabilities": i.capabilities, "subjects": i.subjects, "http_addr": i.http_addr,
        "state": i.state().as_str_name(), "incompatible": i.incompatible,
        "registered_ms": i.registered_ms, "changed_ms": i.changed_ms,
    })
}

fn node_json(n: &Node) -> Value {
    json!({
        "name": n.name, "memory_bytes": n.memory_bytes, "reserved_bytes": n.reserved_bytes, "cpus": n.cpus,
        "labels": n.labels.iter().collect::<std::collections::BTreeMap<_, _>>(), "state": n.state().as_str_name(),
        "jetstream_server": n.jetstream_server, "changed_ms": n.changed_ms, "reason": n.reason,
    })
}

pub(super) async fn components(State(s): State<Arc<AppState>>, Query(q): Query<HashMap<String, String>>) -> ApiResult {
    let query = ListInstances {
        component: q.get("component").cloned().unwrap_or_default(),
        capability: q.get("capability").cloned().unwrap_or_default(),
        node: q.get("node").cloned().unwrap_or_default(),
        include_gone: q.get("include_gone").is_some_and(|v| v == "true"),
    };
    let r: InstanceList = request(&s, registry::query(registry::qry::INSTANCES), &query, "registry").await?;
    Ok(json_response(StatusCode::OK, json!({ "instances": r.instances.iter().map(instance_json).collect::<Vec<_>>() })))
}

pub(super) async fn nodes(State(s): State<Arc<AppState>>, Query(q): Query<HashMap<String, String>>) -> ApiResult {
    let query = ListNodes { include_decommissioned: q.get("include_decommissioned").is_some_and(|v| v == "true") };
    let r: NodeList = request(&s, registry::query(registry::qry::NODES), &query, "registry").await?;
    Ok(json_response(StatusCode::OK, json!({ "nodes": r.nodes.iter().map(node_json).collect::<Vec<_>>() })))
}

pub(super) async fn status(State(s): State<Arc<AppState>>) -> ApiResult {
    let r: Overview =
        request(&s, registry::query(registry::qry::OVERVIEW), &GetOverview { deep: false }, "registry").await?;
    Ok(json_response(
        StatusCode::OK,
        json!({
            "instances": r.instances.iter().map(instance_json).collect::<Vec<_>>(),
            "nodes": r.nodes.iter().map(node_json).collect::<Vec<_>>(),
            "desired": r.desired.iter().map(|d| json!({ "service": d.service, "replicas": d.replicas })).collect::<Vec<_>>(),
            "desired_is_default": r.desired_is_default,
            "problems": r.problems.iter().map(|p| json!({ "subject": p.subject, "reason": p.reason })).collect::<Vec<_>>(),
            "converged": r.problems.is_empty(),
            "registry_instance": r.registry_instance,
        }),
    ))
}

pub(super) async fn plugins(State(s): State<Arc<AppState>>, Query(q): Query<HashMap<String, String>>) -> ApiResult {
    let query = ListPlugins {
        name: q.get("name").cloned().unwrap_or_default(),
        capability: q.get("capability").cloned().unwrap_or_default(),
    };
    let r: ListReply = request(&s, plugin::query(plugin::qry::LIST), &query, "plugin host").await?;
    let list: Vec<Value> = r
        .plugins
        .iter()
        .map(|p| {
            json!({
                "name": p.name, "version": p.version, "digest": p.digest, "size": p.size, "capabilities": p.capabilities,
                "runtime": p.runtime, "subject": p.subject, "state": p.state, "description": p.description,
            })
        })
        .collect();
    Ok(json_response(StatusCode::OK, json!({ "plugins": list })))
}
