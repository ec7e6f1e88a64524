//! Opening a durable pull consumer that every instance of a service shares: created with its
//! configuration if it is not there, bound to as it is if it is. Callers retry with
//! [`crate::Ctx::retry_until_stopped`], since the stream may be missing for a moment (NATS
//! restarting, the stream being re-provisioned).

use async_nats::jetstream::{
    self,
    consumer::{Consumer, pull},
};

/// The durable consumer `config.durable_name` on `stream`, created if missing.
pub async fn durable(
    js: &jetstream::Context,
    stream: &str,
    config: pull::Config,
) -> anyhow::Result<Consumer<pull::Config>> {
    let name = config.durable_name.clone().ok_or_else(|| anyhow::anyhow!("a durable consumer needs a name"))?;
    let stream = js.get_stream(stream).await?;
    Ok(stream.get_or_create_consumer(&name, config).await?)
}
