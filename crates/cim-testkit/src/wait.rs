//! Waiting for conditions with a deadline (never a fixed sleep).

use std::future::Future;
use std::time::Duration;

use anyhow::{Result, anyhow};
use tokio::time::Instant;

const FIRST_PAUSE: Duration = Duration::from_millis(10);
const MAX_PAUSE: Duration = Duration::from_millis(200);

/// Calls `f` until it returns `Ok`, pausing 10 ms, growing to 200 ms, between attempts.
///
/// After `timeout` it gives up with an error whose message names `what` and whose cause
/// (shown by `{:#}`) is the last error `f` returned. An attempt still running at the deadline
/// is cancelled, so a hanging attempt cannot stretch the wait.
///
/// `f` is a plain closure returning a future (`|| async { ... }`), which keeps the wait
/// `Send` (an `AsyncFnMut` bound would not be, on current Rust). An attempt therefore cannot
/// hold a mutable borrow of captured state: fetch a fresh handle inside the attempt instead
/// (e.g. `js.get_stream(name)` rather than a captured `&mut Stream`).
///
/// ```no_run
/// # async fn demo(js: async_nats::jetstream::Context) -> anyhow::Result<()> {
/// use std::time::Duration;
/// cim_testkit::eventually(Duration::from_secs(10), "3 messages in ORDERS", || async {
///     let n = js.get_stream("ORDERS").await?.info().await?.state.messages;
///     anyhow::ensure!(n == 3, "{n} messages");
///     Ok(())
/// })
/// .await?;
/// # Ok(()) }
/// ```
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    poll(timeout, what, || {
        let attempt = f();
        async move {
            match attempt.await {
                Ok(v) => Attempt::Done(v),
                Err(e) => Attempt::Retry(e),
            }
        }
    })
    .await
}

/// Calls `check` again and again for the whole of `duration` (pausing 10 ms, growing to
/// 200 ms, between checks) and fails the first time it returns an error: the way to assert
/// that nothing more happens (no second run, no late repeat), instead of a fixed sleep
/// followed by one look.
///
/// The error names `what`, how long the condition held, and (as its cause) what `check`
/// returned. A check still running when the duration ends is waited for, so the last look
/// is always a complete one.
///
/// ```no_run
/// # async fn demo(js: async_nats::jetstream::Context) -> anyhow::Result<()> {
/// use std::time::Duration;
/// cim_testkit::stays_true_for(Duration::from_millis(500), "still 3 messages in ORDERS", || async {
///     let n = js.get_stream("ORDERS").await?.info().await?.state.messages;
///     anyhow::ensure!(n == 3, "{n} messages");
///     Ok(())
/// })
/// .await?;
/// # Ok(()) }
/// ```
pub async fn stays_true_for<F, Fut>(duration: Duration, what: &str, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<()>>,
{
    let start = Instant::now();
    let end = start + duration;
    let mut pause = FIRST_PAUSE;
    let mut checks = 0u32;
    loop {
        checks += 1;
        if let Err(e) = check().await {
            return Err(e.context(format!(
                "{what} stopped holding after {:?} (check {checks} of a {duration:?} watch)",
                start.elapsed()
            )));
        }
        let now = Instant::now();
        if now >= end {
            return Ok(());
        }
        tokio::time::sleep(pause.min(end - now)).await;
        pause = (pause * 2).min(MAX_PAUSE);
    }
}

/// `eventually!(timeout, "what", { body })`: [`eventually`] with an async block as the attempt.
/// The body evaluates to `anyhow::Result<T>` and may use `?`; it runs again on each attempt.
#[macro_export]
macro_rules! eventually {
    ($timeout:expr, $what:expr, $body:expr $(,)?) => {
        $crate::eventually($timeout, $what, || async { $body }).await
    };
}

/// The outcome of one poll attempt; `Fail` stops at once (e.g. the server process exited).
pub(crate) enum Attempt<T> {
    Done(T),
    Retry(anyhow::Error),
    Fail(anyhow::Error),
}

pub(crate) async fn poll<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Attempt<T>>,
{
    let start = Instant::now();
    let deadline = start + timeout;
    let mut pause = FIRST_PAUSE;
    let mut attempts = 0u32;
    let mut last: anyhow::Error;
    loop {
        attempts += 1;
        // Give even a late attempt a little time, so a zero timeout still tries once.
        let budget = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(50));
        match tokio::time::timeout(budget, f()).await {
            Ok(Attempt::Done(v)) => return Ok(v),
            Ok(Attempt::Retry(e)) => last = e,
            Ok(Attempt::Fail(e)) => return Err(e.context(format!("while waiting for {what}"))),
            Err(_) => last = anyhow!("attempt still running at the deadline"),
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(
                last.context(format!("timed out after {:?} ({attempts} attempts) waiting for {what}", now - start))
            );
        }
        tokio::time::sleep(pause.min(deadline - now)).await;
        pause = (pause * 2).min(MAX_PAUSE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn eventually_retries_until_ok_and_names_what_on_timeout() {
        let mut n = 0;
        let v = eventually(Duration::from_secs(5), "three tries", || {
            n += 1;
            let n = n;
            async move { if n >= 3 { Ok(n) } else { Err(anyhow!("only {n}")) } }
        })
        .await
        .unwrap();
        assert_eq!(v, 3);

        // Usable inside spawned tasks: the future is Send for Send captures.
        let spawned = tokio::spawn(async {
            let mut tries = 0u32;
            eventually(Duration::from_secs(5), "spawned", || {
                tries += 1;
                let t = tries;
                async move {
                    tokio::task::yield_now().await;
                    if t >= 2 { Ok(t) } else { Err(anyhow!("again")) }
                }
            })
            .await
        });
        assert_eq!(spawned.await.unwrap().unwrap(), 2);

        let err = eventually(Duration::from_millis(50), "the impossible", || async { Err::<(), _>(anyhow!("nope")) })
            .await
            .unwrap_err();
        assert!(err.to_string().contains("the impossible"), "{err:#}");
        assert!(format!("{err:#}").contains("nope"), "{err:#}");
    }

    #[tokio::test]
    async fn stays_true_for_watches_the_whole_duration_and_fails_at_the_first_false() {
        let start = Instant::now();
        let mut n = 0u32;
        stays_true_for(Duration::from_millis(300), "always true", || {
            n += 1;
            async { Ok(()) }
        })
        .await
        .unwrap();
        assert!(start.elapsed() >= Duration::from_millis(300), "{:?}", start.elapsed());
        assert!(n >= 3, "checked {n} times");

        let start = Instant::now();
        let mut n = 0u32;
        let err = stays_true_for(Duration::from_secs(30), "below three", || {
            n += 1;
            let n = n;
            async move { if n < 3 { Ok(()) } else { Err(anyhow!("reached {n}")) } }
        })
        .await
        .unwrap_err();
        assert!(start.elapsed() < Duration::from_secs(5), "failed at once: {:?}", start.elapsed());
        assert!(err.to_string().contains("below three"), "{err:#}");
        assert!(format!("{err:#}").contains("reached 3"), "{err:#}");
    }

    fn assert_send<T: Send>(_: T) {}

    #[test]
    fn server_starts_are_send() {
        assert_send(crate::NatsServer::start());
        assert_send(crate::NatsCluster::start(3));
        assert_send(crate::S3Server::start());
    }
}
