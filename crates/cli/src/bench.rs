pub async fn run(_a: BenchArgs, _f: crate::Format) -> anyhow::Result<()> {
    anyhow::bail!("todo")
}
#[derive(clap::Args, Debug)]
pub struct BenchArgs {}
