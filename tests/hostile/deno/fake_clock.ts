// Fake the metrics: replace the clock and rounding the wrapper measures executionTimeMs with
// (performance.now, Math.round, Date.now), so the answer claims 4242 ms (or 10^15 ms, which the
// PDS would refuse in a result record). Expected: the wrapper measures with the functions it
// captured before the bundle was loaded.
performance.now = () => 1e15;
Math.round = () => 4242;
Date.now = () => 1e15;

export function main() {
  return { real: true };
}
