//! `hybridlet devices`: what discovery sees, as a table grouped by NUMA node and PCIe
//! switch, or as JSON or YAML.

use anyhow::Context as _;
use hybridlet_sys::Sysfs;

use crate::cli::{Cli, DevicesArgs, OutputFormat};
use crate::exit::Failure;

pub fn devices(cli: &Cli, args: &DevicesArgs) -> Result<(), Failure> {
    let source = hybridlet_devices::gpu_source(args.nvml_fixture.as_deref())?;
    let sysfs = Sysfs::new(&cli.host_root());
    let report = hybridlet_devices::discover(&sysfs, source.as_deref())?.report();
    let text = match args.output {
        OutputFormat::Json => {
            serde_json::to_string_pretty(&report).context("encoding JSON")? + "\n"
        }
        OutputFormat::Yaml => serde_saphyr::to_string(&report).context("encoding YAML")?,
        OutputFormat::Table => hybridlet_devices::table(&report),
    };
    {
        use std::io::Write as _;
        let _ = std::io::stdout().lock().write_all(text.as_bytes());
    }
    Ok(())
}
