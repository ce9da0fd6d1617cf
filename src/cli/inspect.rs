//! `oci2uk inspect`: what a baked file, a pushed unikernel or an image holds.

use anyhow::Context as _;

use oci2uk::artifact::{fetch, inspect, BakedInfo};
use oci2uk::cache::Cache;
use oci2uk::image::{Platform, ResolveOptions};
use oci2uk::input::Input;
use oci2uk::progress::Progress;
use oci2uk::reference::Source;
use oci2uk::registry::RegistryOptions;

use super::args::InspectArgs;

pub async fn cmd_inspect(args: InspectArgs) -> anyhow::Result<()> {
    let cache = Cache::open(args.common.cache.as_deref())?;
    let registry: RegistryOptions = args.registry.into();
    let platform = match &args.platform {
        Some(p) => p.parse::<Platform>()?,
        None => Platform::host(),
    };
    let target = &args.target;
    let report = match Input::parse(target)? {
        Input::File(path) => {
            let info = tokio::task::spawn_blocking(move || BakedInfo::read(&path)).await??;
            inspect::file(target, &info)
        }
        Input::Image(Source::Registry(r)) => {
            let remote = fetch::resolve(&r, &registry, &platform).await?;
            let config = if remote.resolved.is_unikernel() || remote.resolved.is_kernel() {
                None
            } else {
                Some(remote.config(&cache).await?)
            };
            inspect::remote(&remote.resolved, config.as_ref())
        }
        Input::Image(source) => {
            let opts = ResolveOptions {
                platform,
                registry,
                max_blob_size: None,
            };
            let img = oci2uk::image::resolve(&source, &opts, &cache, &Progress::hidden())
                .await
                .with_context(|| format!("cannot get image {target}"))?;
            inspect::image(&img)
        }
    };
    if args.common.json {
        super::out(&format!("{}\n", serde_json::to_string(&report)?))?;
    } else {
        super::out(&inspect::text(&report))?;
    }
    Ok(())
}
