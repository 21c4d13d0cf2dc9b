//! What `terna pools`, `terna volumes` and `terna status` print: rows
//! gathered from a standalone data dir or from a cluster's CRDs, rendered
//! as tables for people or JSON for scripts. Rendering is pure.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::core::config::{CONFIG_FILE, Config};
use crate::core::error::{Error, Result};
use crate::core::store::StateStore;
use crate::core::volume::{ReplicaState, VolumeRecord};
use crate::datapath::dirty_maps::DirtyMapFiles;
use crate::datapath::host::files::FileStore;
use crate::edge::kube::crd::human_bytes;

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PoolRow {
    pub name: String,
    pub node: String,
    pub tier: String,
    pub zone: String,
    pub capacity_bytes: u64,
    pub allocated_bytes: u64,
    pub health: String,
    pub write_mib_per_sec: Option<f64>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct VolumeRow {
    pub id: String,
    pub name: String,
    pub size_bytes: u64,
    pub tier: Option<String>,
    pub healthy_replicas: usize,
    pub replicas: usize,
    /// healthy, degraded, rebuilding or faulted.
    pub state: String,
    pub staged_on: Option<String>,
    /// Fraction of the least advanced faulted replica already caught up,
    /// when its dirty map is readable here (the node that stages it).
    pub catch_up_progress: Option<f64>,
    pub message: Option<String>,
}

/// A text bar: `[##########..........]  50%`.
pub fn progress_bar(fraction: f64, width: usize) -> String {
    let f = fraction.clamp(0.0, 1.0);
    let filled = (f * width as f64).round() as usize;
    format!(
        "[{}{}] {:>3.0}%",
        "#".repeat(filled),
        ".".repeat(width - filled),
        f * 100.0
    )
}

pub fn pools_table(rows: &[PoolRow]) -> String {
    let mut out = format!(
        "{:<24} {:<12} {:<9} {:<10} {:>10} {:>10} {:>6} {:>11} {}\n",
        "POOL", "NODE", "TIER", "ZONE", "CAPACITY", "ALLOCATED", "USED%", "WRITE MiB/s", "HEALTH"
    );
    for p in rows {
        let used = if p.capacity_bytes == 0 {
            "-".to_string()
        } else {
            format!(
                "{:.0}",
                p.allocated_bytes as f64 * 100.0 / p.capacity_bytes as f64
            )
        };
        out += &format!(
            "{:<24} {:<12} {:<9} {:<10} {:>10} {:>10} {:>6} {:>11} {}\n",
            p.name,
            p.node,
            p.tier,
            p.zone,
            human_bytes(p.capacity_bytes),
            human_bytes(p.allocated_bytes),
            used,
            p.write_mib_per_sec
                .map_or("-".to_string(), |m| format!("{m:.0}")),
            p.health
        );
    }
    out
}

pub fn volumes_table(rows: &[VolumeRow]) -> String {
    let mut out = format!(
        "{:<28} {:<40} {:>8} {:<9} {:>8} {:<11} {:<10} {}\n",
        "ID", "NAME", "SIZE", "TIER", "REPLICAS", "STATE", "STAGED ON", "PROGRESS"
    );
    for v in rows {
        out += &format!(
            "{:<28} {:<40} {:>8} {:<9} {:>8} {:<11} {:<10} {}\n",
            v.id,
            v.name,
            human_bytes(v.size_bytes),
            v.tier.as_deref().unwrap_or("any"),
            format!("{}/{}", v.healthy_replicas, v.replicas),
            v.state,
            v.staged_on.as_deref().unwrap_or("-"),
            v.catch_up_progress
                .map_or(String::new(), |f| progress_bar(f, 20)),
        );
    }
    out
}

/// One screen: pool totals, volume counts by state, and every volume that
/// is not healthy with the reason.
pub fn status_text(pools: &[PoolRow], volumes: &[VolumeRow]) -> String {
    let ready = pools.iter().filter(|p| p.health == "Ready").count();
    let capacity: u64 = pools.iter().map(|p| p.capacity_bytes).sum();
    let allocated: u64 = pools.iter().map(|p| p.allocated_bytes).sum();
    let mut by_state: BTreeMap<&str, usize> = BTreeMap::new();
    for v in volumes {
        *by_state.entry(v.state.as_str()).or_default() += 1;
    }
    let mut out = format!(
        "pools:   {ready}/{} ready, {} allocated of {}\n",
        pools.len(),
        human_bytes(allocated),
        human_bytes(capacity)
    );
    out += &format!(
        "volumes: {} ({})\n",
        volumes.len(),
        if by_state.is_empty() {
            "none".to_string()
        } else {
            by_state
                .iter()
                .map(|(s, n)| format!("{n} {s}"))
                .collect::<Vec<_>>()
                .join(", ")
        }
    );
    for v in volumes.iter().filter(|v| v.state != "healthy") {
        out += &format!(
            "  {} {} ({}): {}\n",
            v.state,
            v.id,
            v.name,
            v.message.as_deref().unwrap_or("no details")
        );
        if let Some(f) = v.catch_up_progress {
            out += &format!("    catch-up {}\n", progress_bar(f, 30));
        }
    }
    out
}

fn volume_row(r: &VolumeRecord, progress: Option<f64>) -> VolumeRow {
    VolumeRow {
        id: r.id.clone(),
        name: r.name.clone(),
        size_bytes: r.capacity_bytes,
        tier: r.class.tier.map(|t| t.to_string()),
        healthy_replicas: r.healthy_count(),
        replicas: r.replicas.len(),
        state: crate::edge::kube::store::volume_state(r).to_string(),
        staged_on: r.staged_on.as_ref().map(|s| s.node.clone()),
        catch_up_progress: progress,
        message: r.degradation(),
    }
}

/// How far the least advanced faulted replica has caught up, from the
/// dirty maps this data dir holds.
fn catch_up_progress(data_dir: &Path, r: &VolumeRecord) -> Option<f64> {
    let maps = DirtyMapFiles::new(data_dir);
    r.replicas
        .iter()
        .enumerate()
        .filter(|(_, rep)| matches!(rep.state, ReplicaState::Faulted { .. }))
        .filter_map(|(i, _)| {
            let map = maps.load(&r.id, i).ok()??;
            (map.regions() > 0).then(|| 1.0 - map.count() as f64 / map.regions() as f64)
        })
        .reduce(f64::min)
}

/// Pools and volumes of a standalone data dir.
pub fn from_data_dir(data_dir: &Path, node: &str) -> Result<(Vec<PoolRow>, Vec<VolumeRow>)> {
    let path = data_dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| {
        Error::io(
            format!(
                "{} is not a Terna data dir (no {CONFIG_FILE})",
                data_dir.display()
            ),
            e,
        )
    })?;
    let config = Config::parse(&text, &path)?;
    let records = FileStore::open(&crate::core::data_dir::state_dir(data_dir))?.list()?;
    let mut allocated: BTreeMap<&str, u64> = BTreeMap::new();
    for r in &records {
        for rep in &r.replicas {
            *allocated.entry(rep.pool.as_str()).or_default() += r.capacity_bytes;
        }
    }
    let token = crate::datapath::pools::cluster_token(&config, data_dir, node)?;
    let transport = crate::datapath::pools::transport(data_dir, node);
    let pools = crate::datapath::pools::from_config(&config, data_dir, node, &token, &transport)?;
    let pool_rows = pools
        .all()
        .into_iter()
        .map(|p| {
            let capacity = p.backend.capacity();
            PoolRow {
                name: p.name.clone(),
                node: p.node.clone(),
                tier: p.tier.to_string(),
                zone: p.zone.clone(),
                capacity_bytes: *capacity.as_ref().unwrap_or(&0),
                allocated_bytes: allocated.get(p.name.as_str()).copied().unwrap_or(0),
                health: match capacity {
                    Ok(_) => "Ready".into(),
                    Err(e) => format!("NotReady: {}", e.message),
                },
                write_mib_per_sec: None,
            }
        })
        .collect();
    let volume_rows = records
        .iter()
        .map(|r| volume_row(r, catch_up_progress(data_dir, r)))
        .collect();
    Ok((pool_rows, volume_rows))
}

/// Pools and volumes of a cluster, from its StoragePools and TernaVolumes.
async fn from_cluster(kubeconfig: Option<&Path>) -> Result<(Vec<PoolRow>, Vec<VolumeRow>)> {
    let report = crate::edge::kube::cluster_report::fetch(kubeconfig).await?;
    let pool_rows = report
        .pools
        .iter()
        .map(|p| {
            let status = p.status.clone().unwrap_or_default();
            PoolRow {
                name: p.metadata.name.clone().unwrap_or_default(),
                node: p.spec.node.clone(),
                tier: p.spec.tier.to_string(),
                zone: p.spec.zone.clone().unwrap_or_else(|| "default".into()),
                capacity_bytes: status.capacity_bytes,
                allocated_bytes: status.allocated_bytes,
                health: if status.health.is_empty() {
                    "Unknown".into()
                } else {
                    status.health
                },
                write_mib_per_sec: status.measured_write_mib_per_sec,
            }
        })
        .collect();
    let volume_rows = report.volumes.iter().map(|r| volume_row(r, None)).collect();
    Ok((pool_rows, volume_rows))
}

/// The reports, each a subcommand of its own.
#[derive(clap::Subcommand)]
pub enum Args {
    /// Volumes with replica health and catch-up progress.
    Volumes {
        #[command(flatten)]
        source: Source,
        /// Refresh every 2 s until every volume is healthy.
        #[arg(long)]
        watch: bool,
    },
    /// Pools with tier, capacity, allocation and health.
    Pools {
        #[command(flatten)]
        source: Source,
    },
    /// Pools and volumes at a glance, and what is not healthy.
    Status {
        #[command(flatten)]
        source: Source,
        /// Refresh every 2 s until every volume is healthy.
        #[arg(long)]
        watch: bool,
    },
}

/// Where the reports read from: a standalone data dir, or the cluster.
#[derive(clap::Args)]
pub struct Source {
    #[arg(long, default_value = "/var/lib/terna")]
    data_dir: PathBuf,
    /// Read the cluster's StoragePools and TernaVolumes instead.
    #[arg(long)]
    cluster: bool,
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// table or json
    #[arg(short = 'o', long, default_value = "table")]
    output: String,
}

type Rows = (Vec<PoolRow>, Vec<VolumeRow>);

pub fn run(args: Args) -> Result<()> {
    match args {
        Args::Volumes { source, watch } => {
            let json = source.output == "json";
            print_rows(&source, watch, |(_, volumes)| {
                Ok(if json {
                    to_json(volumes)?
                } else {
                    volumes_table(volumes)
                })
            })
        }
        Args::Pools { source } => {
            let json = source.output == "json";
            print_rows(&source, false, |(pools, _)| {
                Ok(if json {
                    to_json(pools)?
                } else {
                    pools_table(pools)
                })
            })
        }
        Args::Status { source, watch } => {
            let json = source.output == "json";
            print_rows(&source, watch, |(pools, volumes)| {
                Ok(if json {
                    to_json(&serde_json::json!({"pools": pools, "volumes": volumes}))?
                } else {
                    status_text(pools, volumes)
                })
            })
        }
    }
}

fn to_json(value: &impl Serialize) -> Result<String> {
    serde_json::to_string_pretty(value)
        .map(|text| text + "\n")
        .map_err(|e| Error::internal(format!("cannot encode the report: {e}")))
}

fn gather(source: &Source) -> Result<Rows> {
    if !matches!(source.output.as_str(), "table" | "json") {
        return Err(Error::invalid(format!(
            "output format {:?} is unknown: use table or json",
            source.output
        )));
    }
    if source.cluster {
        tokio::runtime::Runtime::new()
            .map_err(|e| Error::io("cannot start the async runtime", e))?
            .block_on(from_cluster(source.kubeconfig.as_deref()))
    } else {
        let node = crate::datapath::host::hostname::hostname()?;
        from_data_dir(&source.data_dir, &node)
    }
}

/// Prints `render` of fresh rows; with `watch`, again every 2 s until no
/// volume is unhealthy.
fn print_rows(
    source: &Source,
    watch: bool,
    render: impl Fn(&Rows) -> Result<String>,
) -> Result<()> {
    loop {
        let rows = gather(source)?;
        print!("{}", render(&rows)?);
        if !watch || rows.1.iter().all(|v| v.state == "healthy") {
            return Ok(());
        }
        println!();
        std::thread::sleep(std::time::Duration::from_secs(2));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(name: &str, health: &str) -> PoolRow {
        PoolRow {
            name: name.into(),
            node: "n1".into(),
            tier: "fast".into(),
            zone: "z".into(),
            capacity_bytes: 4 << 30,
            allocated_bytes: 1 << 30,
            health: health.into(),
            write_mib_per_sec: Some(812.4),
        }
    }

    #[test]
    fn progress_bars() {
        assert_eq!(progress_bar(0.0, 10), "[..........]   0%");
        assert_eq!(progress_bar(0.5, 10), "[#####.....]  50%");
        assert_eq!(progress_bar(1.7, 4), "[####] 100%");
    }

    #[test]
    fn tables_and_status_say_what_matters() {
        let pools = vec![pool("a", "Ready"), pool("b", "NotReady: disk gone")];
        let table = pools_table(&pools);
        assert!(
            table.contains("4Gi") && table.contains("25") && table.contains("812"),
            "{table}"
        );
        let mut record = crate::core::volume::tests::record(3);
        record.fault_replica(1, "agent unreachable");
        let volumes = vec![volume_row(&record, Some(0.25))];
        let table = volumes_table(&volumes);
        assert!(
            table.contains("2/3") && table.contains("degraded") && table.contains(" 25%"),
            "{table}"
        );
        let status = status_text(&pools, &volumes);
        assert!(status.contains("pools:   1/2 ready"), "{status}");
        assert!(status.contains("1 degraded"), "{status}");
        assert!(status.contains("agent unreachable"), "{status}");
    }
}
