//! Reading the traces an [`OtlpReceiver`] got: the trace a pod's connection opened, and its
//! spans' attributes, read strictly (an attribute appears once, with the type it must have).
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::{
    common::v1::{KeyValue, any_value::Value as AnyValue},
    trace::v1::Span,
};

use crate::otlp::{OtlpReceiver, Received};

/// A root span with its resource and every other span of its trace, in the order received.
#[derive(Debug)]
pub struct Trace {
    pub resource: Vec<KeyValue>,
    pub root: Span,
    pub others: Vec<Span>,
}

/// Every trace whose root was opened by `cgroup_id` (the agent sees the whole machine).
pub fn traces_of_cgroup(received: &[Received], cgroup_id: u64) -> Vec<Trace> {
    let mut traces = Vec::new();
    let spans: Vec<(&Vec<KeyValue>, &Span)> = received
        .iter()
        .flat_map(|r| &r.request.resource_spans)
        .flat_map(|rs| {
            let resource = rs.resource.as_ref().map(|r| &r.attributes);
            rs.scope_spans
                .iter()
                .flat_map(|ss| &ss.spans)
                .map(move |s| (resource.expect("every resource_spans has a resource"), s))
        })
        .collect();
    for (resource, root) in &spans {
        if root.parent_span_id.is_empty()
            && int_attr(&root.attributes, "observer.cgroup.id") == Some(cgroup_id as i64)
        {
            traces.push(Trace {
                resource: (*resource).clone(),
                root: (*root).clone(),
                others: spans
                    .iter()
                    .filter(|(_, s)| s.trace_id == root.trace_id && s.span_id != root.span_id)
                    .map(|(_, s)| (*s).clone())
                    .collect(),
            });
        }
    }
    traces
}

/// Polls the receiver until `pred` holds for a trace of `cgroup_id`.
pub fn wait_for_trace(
    receiver: &OtlpReceiver,
    cgroup_id: u64,
    within: Duration,
    pred: impl Fn(&Trace) -> bool,
) -> Trace {
    let deadline = Instant::now() + within;
    loop {
        if let Some(trace) = traces_of_cgroup(&receiver.received(), cgroup_id)
            .into_iter()
            .find(|t| pred(t))
        {
            return trace;
        }
        assert!(
            Instant::now() < deadline,
            "no matching trace of cgroup {cgroup_id} within {within:?}; traces of it: {:#?}",
            traces_of_cgroup(&receiver.received(), cgroup_id)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn attr<'a>(attrs: &'a [KeyValue], key: &str) -> Option<&'a AnyValue> {
    let mut found = attrs.iter().filter(|kv| kv.key == key);
    let first = found.next()?;
    assert!(found.next().is_none(), "attribute {key} appears twice");
    first.value.as_ref()?.value.as_ref()
}

pub fn str_attr<'a>(attrs: &'a [KeyValue], key: &str) -> Option<&'a str> {
    match attr(attrs, key)? {
        AnyValue::StringValue(s) => Some(s),
        other => panic!("attribute {key} is not a string: {other:?}"),
    }
}

pub fn int_attr(attrs: &[KeyValue], key: &str) -> Option<i64> {
    match attr(attrs, key)? {
        AnyValue::IntValue(i) => Some(*i),
        other => panic!("attribute {key} is not an int: {other:?}"),
    }
}

pub fn bool_attr(attrs: &[KeyValue], key: &str) -> Option<bool> {
    match attr(attrs, key)? {
        AnyValue::BoolValue(b) => Some(*b),
        other => panic!("attribute {key} is not a bool: {other:?}"),
    }
}

pub fn str_array_attr(attrs: &[KeyValue], key: &str) -> Option<Vec<String>> {
    match attr(attrs, key)? {
        AnyValue::ArrayValue(a) => Some(
            a.values
                .iter()
                .map(|v| match &v.value {
                    Some(AnyValue::StringValue(s)) => s.clone(),
                    other => panic!("attribute {key} holds a non-string: {other:?}"),
                })
                .collect(),
        ),
        other => panic!("attribute {key} is not an array: {other:?}"),
    }
}
