//! `idem inspect`: look at what idem stored.

use std::process::ExitCode;

use clap::{Args, Subcommand};

use crate::config::Config;
use crate::store::{self, KeyLayout};

/// Look at what idem stored in Redis (entity, outbox) and at a consumer group in Kafka (group)
///
/// Examples:
///   idem inspect entity orders:42 --json
///   idem inspect group orders-view
///   idem inspect outbox
#[derive(Debug, Args)]
#[command(verbatim_doc_comment)]
pub struct InspectArgs {
    #[command(subcommand)]
    what: InspectWhat,
}

#[derive(Debug, Subcommand)]
#[command(verbatim_doc_comment)]
enum InspectWhat {
    /// Show one entity as Redis holds it
    ///
    /// Its state, seq, last event id, applied-events count and update time;
    /// with declared effects also its counters, each ledger's length and
    /// newest entry, and each set's size.
    ///
    /// Example:
    ///   idem inspect entity orders:42 --json
    ///
    /// The --json form is stable (see docs/redis-layout.md). Exits 3 when the
    /// entity is unknown.
    #[command(verbatim_doc_comment)]
    Entity {
        /// The entity, exactly as in the events' `entity` field.
        entity: String,
        /// Print one JSON document instead of text: an object (docs/redis-layout.md).
        #[arg(long)]
        json: bool,
        /// Also show what per-field order keeps (state.order = "per_field"): the seq
        /// that wrote each field, removed fields, the floor and the existence seq.
        #[arg(long)]
        field_seqs: bool,
    },
    /// Show a consumer group as Kafka holds it
    ///
    /// Its state, members and their partitions, committed vs end offsets
    /// and the lag of each partition.
    ///
    /// Example:
    ///   idem inspect group orders-view
    ///   idem inspect group orders-view --topic orders
    ///
    /// The group defaults to kafka.group_id; its topics are found in Kafka:
    /// those it has committed offsets on and those its members are assigned.
    /// Exits 3 when the group does not exist (no members, nothing committed).
    #[command(verbatim_doc_comment)]
    Group {
        /// The group (default: kafka.group_id).
        group: Option<String>,
        /// Only these topics (default: the group's own, found in Kafka); repeat for several.
        #[arg(long = "topic")]
        topics: Vec<String>,
        /// Print one JSON document instead of text: an object.
        #[arg(long)]
        json: bool,
    },
    /// Show the changelog's outboxes (docs/change-stream.md)
    ///
    /// Each outbox that holds changes not yet published: its depth, its
    /// oldest change and that change's age; and which relay holds the lease.
    /// On a Redis Cluster every slot's outbox is measured (16,384 XLENs).
    ///
    /// Example:
    ///   idem inspect outbox --json
    #[command(verbatim_doc_comment)]
    Outbox {
        /// Print one JSON document instead of text: an object.
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(args: InspectArgs, config: Config) -> anyhow::Result<ExitCode> {
    match args.what {
        InspectWhat::Group {
            group,
            topics,
            json,
        } => {
            let group = group.unwrap_or_else(|| config.kafka.group_id.clone());
            let kafka = config.kafka.clone();
            let status = tokio::task::spawn_blocking(move || {
                crate::tools::group::group_status(&kafka, &group, &topics)
            })
            .await??;
            if json {
                crate::outln!("{}", serde_json::to_string_pretty(&status)?);
            } else if !status.exists() {
                let on: std::collections::BTreeSet<_> =
                    status.partitions.iter().map(|p| p.topic.as_str()).collect();
                let on = if on.is_empty() {
                    "any topic".to_string()
                } else {
                    on.into_iter().collect::<Vec<_>>().join(",")
                };
                crate::outln!(
                    "group {}: no such group (no members, no committed offsets on {on})",
                    status.group
                );
            } else {
                print_group(&status);
            }
            Ok(if status.exists() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(super::EXIT_NOT_FOUND)
            })
        }
        InspectWhat::Entity {
            entity,
            json,
            field_seqs,
        } => inspect_entity(&config, &entity, json, field_seqs).await,
        InspectWhat::Outbox { json } => {
            let status = crate::tools::outbox::outbox_status(&config).await?;
            if json {
                crate::outln!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                crate::outln!("{}", status.to_string().trim_end());
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `idem inspect entity`: the view, its effects, and with `field_seqs` what
/// per-field order keeps.
async fn inspect_entity(
    config: &crate::config::Config,
    entity: &str,
    json: bool,
    field_seqs: bool,
) -> anyhow::Result<ExitCode> {
    let mut conn = store::connect_or_explain(&config.redis).await?;
    let layout = KeyLayout::new(&config.redis.key_prefix);
    let view = store::read_entity(&mut conn, &layout, entity).await?;
    let (streams, sets) = config.effects.names();
    let effects = store::commutative::summary(&mut conn, &layout, entity, &streams, &sets).await?;
    let field_order = match field_seqs {
        true => Some(store::read_field_order(&mut conn, &layout, entity).await?),
        false => None,
    };
    if json {
        crate::outln!(
            "{}",
            serde_json::to_string_pretty(&EntityJson {
                view: &view,
                effects: &effects,
                field_order: field_order.as_ref(),
            })?
        );
    } else if !view.exists {
        crate::outln!(
            "entity {entity:?}: not found under prefix {:?}",
            config.redis.key_prefix
        );
    } else {
        print_entity(&view);
        if let Some(order) = &field_order {
            print_field_order(order, &view);
        }
        print_effects(&effects);
    }
    Ok(if view.exists {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(super::EXIT_NOT_FOUND)
    })
}

/// The group, its members and per-partition lag, as a table.
fn print_group(status: &crate::tools::group::GroupStatus) {
    crate::outln!(
        "group {} ({}, {} protocol), {} member(s)",
        status.group,
        status.state,
        status.protocol,
        status.members.len()
    );
    for m in &status.members {
        let parts: Vec<String> = m
            .assignment
            .iter()
            .map(|a| format!("{}{:?}", a.topic, a.partitions))
            .collect();
        crate::outln!(
            "  {} {} {} {}",
            m.client_id,
            m.host,
            m.member_id,
            parts.join(" ")
        );
    }
    crate::outln!(
        "{:<40} {:>9} {:>12} {:>12} {:>10}",
        "topic",
        "partition",
        "committed",
        "end",
        "lag"
    );
    for p in &status.partitions {
        let committed = p.committed.map_or("-".to_string(), |c| c.to_string());
        crate::outln!(
            "{:<40} {:>9} {:>12} {:>12} {:>10}",
            p.topic,
            p.partition,
            committed,
            p.end,
            p.lag
        );
    }
    crate::outln!("total lag {}", status.total_lag);
}

/// The entity's view, with its commutative state (docs/effects.md) beside
/// it where there is some: the JSON stays as before for entities without.
#[derive(serde::Serialize)]
struct EntityJson<'a> {
    #[serde(flatten)]
    view: &'a store::EntityView,
    #[serde(flatten, skip_serializing_if = "store::commutative::Summary::is_empty")]
    effects: &'a store::commutative::Summary,
    /// With --field-seqs only.
    #[serde(skip_serializing_if = "Option::is_none")]
    field_order: Option<&'a store::FieldOrder>,
}

/// Each field's writer seq (removed fields marked), the floor, existence.
fn print_field_order(order: &store::FieldOrder, view: &store::EntityView) {
    let or_dash = |v: Option<String>| v.unwrap_or_else(|| "-".into());
    crate::outln!("floor       {}", or_dash(order.floor.clone()));
    crate::outln!(
        "exists seq  {}",
        or_dash(order.exists_seq.map(|s| s.to_string()))
    );
    if order.field_seqs_at != view.seq {
        crate::outln!(
            "            (decided under per-entity order since: events older than seq are stale)"
        );
    }
    crate::outln!("field seqs");
    for (k, seq) in &order.field_seqs {
        let removed = if view.state.contains_key(k) {
            ""
        } else {
            " (removed)"
        };
        crate::outln!("  {k} @ {seq}{removed}");
    }
}

/// Counters, each ledger's length and newest entry, each set's size.
fn print_effects(effects: &store::commutative::Summary) {
    if !effects.counters.is_empty() {
        crate::outln!("counters");
        for (k, v) in &effects.counters {
            crate::outln!("  {k} = {v}");
        }
    }
    for (name, l) in &effects.ledgers {
        let last: Vec<String> = l.last.iter().map(|(k, v)| format!("{k}={v}")).collect();
        crate::outln!(
            "ledger {name}  {} entries, newest {} {}",
            l.length,
            l.last_id.as_deref().unwrap_or("-"),
            last.join(" ")
        );
    }
    for (name, size) in &effects.sets {
        crate::outln!("set {name}  {size} members");
    }
}

/// One entity's bookkeeping and state, one field per line.
fn print_entity(view: &store::EntityView) {
    crate::outln!("entity      {}", view.entity);
    crate::outln!(
        "seq         {}",
        view.seq.map_or("-".into(), |s| s.to_string())
    );
    crate::outln!("deleted     {}", view.deleted);
    crate::outln!("last id     {}", view.last_id.as_deref().unwrap_or("-"));
    crate::outln!("applied     {}", view.applied);
    crate::outln!(
        "updated     {}",
        view.updated_ms.map_or("-".into(), |ms| format!(
            "{} ({ms} ms)",
            super::utc_millis(ms as i64)
        ))
    );
    crate::outln!("state");
    for (k, v) in &view.state {
        crate::outln!("  {k} = {v}");
    }
    if !view.offset_marks.is_empty() {
        crate::outln!("offset marks (o:<topic id>:<partition> = <run start>:<offset> decided)");
        for (k, v) in &view.offset_marks {
            crate::outln!("  {k} = {v}");
        }
    }
    if !view.dense_seqs.is_empty() {
        crate::outln!("dense seqs");
        for (k, v) in &view.dense_seqs {
            crate::outln!("  {k} = {v}");
        }
    }
}
