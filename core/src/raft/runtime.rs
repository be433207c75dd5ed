//! The async runtime the groups run on, and the wall clock proposals carry: tokio's and the
//! system's, unless a simulation has taken this thread over ([`simulate_this_thread`]). Then
//! openraft's random numbers (election timeouts) come from a generator seeded by the simulation,
//! and the wall clock follows tokio's (paused, virtual) clock from a fixed epoch, so that one seed
//! replays the same elections and the same timestamps. Touches nothing but this thread's state.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use openraft::async_runtime::{AsyncRuntime, TokioOneShotSender};
use openraft::{OptionalSend, TokioInstant};
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};

/// A simulated wall clock: `epoch_ms` at tokio's instant `origin`, plus `jump_ms`.
#[derive(Clone, Copy)]
struct SimClock {
    origin: tokio::time::Instant,
    epoch_ms: u64,
    jump_ms: i64,
}

thread_local! {
    /// Set while a simulation runs on this thread.
    static SIM_RNG: RefCell<Option<StdRng>> = const { RefCell::new(None) };
    static SIM_CLOCK: Cell<Option<SimClock>> = const { Cell::new(None) };
}

/// Make this thread's groups replayable: random numbers drawn from `seed`, and a wall clock that
/// reads `epoch_ms` now and then moves with tokio's clock (call it inside a runtime whose time is
/// paused). Only for single-threaded simulations: other threads keep the real clock and
/// randomness. [`end_simulation`] gives them back.
pub fn simulate_this_thread(seed: u64, epoch_ms: u64) {
    SIM_RNG.with(|rng| *rng.borrow_mut() = Some(StdRng::seed_from_u64(seed)));
    SIM_CLOCK.with(|clock| clock.set(Some(SimClock { origin: tokio::time::Instant::now(), epoch_ms, jump_ms: 0 })));
}

/// Move this thread's simulated wall clock by `delta_ms` (either way), as an operator or NTP
/// stepping a node's clock would. Does nothing outside a simulation.
pub fn jump_simulated_clock(delta_ms: i64) {
    SIM_CLOCK.with(|clock| {
        if let Some(mut sim) = clock.get() {
            sim.jump_ms = sim.jump_ms.saturating_add(delta_ms);
            clock.set(Some(sim));
        }
    });
}

/// Give this thread back its real clock and randomness.
pub fn end_simulation() {
    SIM_RNG.with(|rng| *rng.borrow_mut() = None);
    SIM_CLOCK.with(|clock| clock.set(None));
}

/// Milliseconds since the Unix epoch: the clock proposals carry (simulated on a simulation's
/// thread).
pub fn wall_clock_ms() -> u64 {
    if let Some(sim) = SIM_CLOCK.with(Cell::get) {
        let elapsed_ms = sim.origin.elapsed().as_millis() as i64;
        return sim.epoch_ms.saturating_add_signed(elapsed_ms.saturating_add(sim.jump_ms));
    }
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// openraft's per-thread random numbers: the simulation's generator when one is set, the
/// system's otherwise.
#[derive(Debug, Clone, Copy, Default)]
pub struct ThreadRng;

impl ThreadRng {
    fn with<T>(f: impl FnOnce(&mut dyn RngCore) -> T) -> T {
        SIM_RNG.with(|sim| match sim.borrow_mut().as_mut() {
            Some(rng) => f(rng),
            None => f(&mut rand::thread_rng()),
        })
    }
}

impl RngCore for ThreadRng {
    fn next_u32(&mut self) -> u32 {
        Self::with(|rng| rng.next_u32())
    }

    fn next_u64(&mut self) -> u64 {
        Self::with(|rng| rng.next_u64())
    }

    fn fill_bytes(&mut self, dest: &mut [u8]) {
        Self::with(|rng| rng.fill_bytes(dest));
    }

    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand::Error> {
        Self::with(|rng| rng.try_fill_bytes(dest))
    }
}

/// tokio, with [`ThreadRng`] for openraft's random numbers.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct WharfRuntime;

impl AsyncRuntime for WharfRuntime {
    type JoinError = tokio::task::JoinError;
    type JoinHandle<T: OptionalSend + 'static> = tokio::task::JoinHandle<T>;
    type Sleep = tokio::time::Sleep;
    type Instant = TokioInstant;
    type TimeoutError = tokio::time::error::Elapsed;
    type Timeout<R, T: Future<Output = R> + OptionalSend> = tokio::time::Timeout<T>;
    type ThreadLocalRng = ThreadRng;
    type OneshotSender<T: OptionalSend> = TokioOneShotSender<T>;
    type OneshotReceiverError = tokio::sync::oneshot::error::RecvError;
    type OneshotReceiver<T: OptionalSend> = tokio::sync::oneshot::Receiver<T>;

    fn spawn<T>(future: T) -> Self::JoinHandle<T::Output>
    where
        T: Future + OptionalSend + 'static,
        T::Output: OptionalSend + 'static,
    {
        tokio::task::spawn(future)
    }

    fn sleep(duration: Duration) -> Self::Sleep {
        tokio::time::sleep(duration)
    }

    fn sleep_until(deadline: Self::Instant) -> Self::Sleep {
        tokio::time::sleep_until(deadline)
    }

    fn timeout<R, F: Future<Output = R> + OptionalSend>(duration: Duration, future: F) -> Self::Timeout<R, F> {
        tokio::time::timeout(duration, future)
    }

    fn timeout_at<R, F: Future<Output = R> + OptionalSend>(deadline: Self::Instant, future: F) -> Self::Timeout<R, F> {
        tokio::time::timeout_at(deadline, future)
    }

    fn is_panic(join_error: &Self::JoinError) -> bool {
        join_error.is_panic()
    }

    fn thread_rng() -> Self::ThreadLocalRng {
        ThreadRng
    }

    fn oneshot<T>() -> (Self::OneshotSender<T>, Self::OneshotReceiver<T>)
    where
        T: OptionalSend,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        (TokioOneShotSender(tx), rx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_simulated_thread_replays_its_random_numbers_and_follows_virtual_time() {
        simulate_this_thread(7, 1_000_000);
        let first: Vec<u64> = (0..4).map(|_| WharfRuntime::thread_rng().next_u64()).collect();
        assert_eq!(wall_clock_ms(), 1_000_000);
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        assert_eq!(wall_clock_ms(), 1_001_500);
        jump_simulated_clock(-2_000);
        assert_eq!(wall_clock_ms(), 999_500);
        simulate_this_thread(7, 0);
        let again: Vec<u64> = (0..4).map(|_| WharfRuntime::thread_rng().next_u64()).collect();
        assert_eq!(first, again, "the same seed gives the same numbers");
        end_simulation();
        assert!(wall_clock_ms() > 1_700_000_000_000, "the real clock is back");
    }
}
