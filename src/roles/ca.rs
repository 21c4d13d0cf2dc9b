//! `terna ca`: the cluster CA file of a standalone data dir or a shared
//! `cluster_ca_file`, shown or rotated one step at a time (a cluster's CA
//! lives in a Secret and the controller rotates it on its own schedule).

use std::path::PathBuf;

use crate::core::error::{Error, Result};
use crate::datapath::tls::ca::{Schedule, Step};

#[derive(clap::Args)]
pub struct Args {
    /// The CA file; default: the data dir's own.
    #[arg(long, global = true)]
    file: Option<PathBuf>,
    #[arg(long, global = true, default_value = "/var/lib/terna")]
    data_dir: PathBuf,
    #[command(subcommand)]
    action: Action,
}

#[derive(clap::Subcommand)]
enum Action {
    /// Prints the CAs and the next rotation step.
    Show,
    /// Takes the next rotation step (stage a new CA, promote it to sign,
    /// retire the old one). Wait until every process has seen a step
    /// (a few seconds where each machine reads the file) before the next.
    Rotate {
        /// The step to take, refused unless it is the next one.
        #[arg(long, value_parser = ["stage", "promote", "retire"])]
        step: Option<String>,
    },
}

fn date(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .map_or_else(|_| unix.to_string(), |t| t.to_string())
}

pub fn run(args: Args) -> Result<()> {
    let file = args
        .file
        .unwrap_or_else(|| crate::core::data_dir::ca_file(&args.data_dir));
    match args.action {
        Action::Show => {
            let set = crate::datapath::tls::store::load(&file)?;
            println!(
                "current:  {} (valid until {})",
                set.current.name,
                date(set.current.not_after)
            );
            if let Some(next) = &set.next {
                println!("next:     {} (trusted, not signing yet)", next.name);
            }
            if let Some(previous) = &set.previous {
                println!("previous: {} (trusted, no longer signing)", previous.name);
            }
            println!(
                "last step {}; next step: {:?}",
                date(set.changed),
                set.next_step()
            );
        }
        Action::Rotate { step } => {
            let step = match step.as_deref() {
                None => None,
                Some("stage") => Some(Step::Stage),
                Some("promote") => Some(Step::Promote),
                Some("retire") => Some(Step::Retire),
                Some(other) => return Err(Error::invalid(format!("no step {other:?}"))),
            };
            let set = crate::datapath::tls::store::rotate(&file, step, &Schedule::default())?;
            println!(
                "signing: {}; trusted: {}; next step: {:?}",
                set.current.name,
                set.trusted().len(),
                set.next_step()
            );
        }
    }
    Ok(())
}
